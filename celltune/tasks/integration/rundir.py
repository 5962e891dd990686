"""The run directory: ``--out`` checks, rank-0 claim (lock + manifest), resume checks,
and the model directory written at the end."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celltune.errors import InputError
from celltune.files import write_json_atomic
from celltune.tasks.config import diff_configs, load_config
from celltune.tasks.integration.config import _RESUME_MAY_CHANGE, TASK_FILE, IntegrationConfig

if TYPE_CHECKING:
    from torch import nn


def _check_resume(cfg: IntegrationConfig, out_dir: Path, resume: bool) -> None:
    from celltune.train import CHECKPOINT_NAME

    ckpt = out_dir / CHECKPOINT_NAME
    saved = out_dir / "config.yaml"
    if not resume:
        if ckpt.is_file():
            raise InputError(
                f"{out_dir} already holds a training checkpoint ({CHECKPOINT_NAME}): pass "
                "--resume to continue that run, or choose a new --out directory"
            )
        return
    if not saved.is_file():
        return
    before = load_config(saved, schema=type(cfg))  # a subclass: PretrainConfig
    changed = diff_configs(before, cfg, ignore=_RESUME_MAY_CHANGE)
    if changed:
        raise InputError(
            f"--resume with settings that differ from the checkpointed run in {out_dir} "
            f"({', '.join(changed)}): re-run with the original settings (see its "
            "config.yaml), or start a new run in another --out directory"
        )


def open_run_dir(
    cfg: IntegrationConfig, out_dir: str | Path | None, resume: bool
) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """The run directory (created; resume checked), or a temporary one for ``None``."""
    if out_dir is None:
        tmp_dir = tempfile.TemporaryDirectory(prefix="celltune-integrate-")
        return Path(tmp_dir.name), tmp_dir
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file; give a directory path for the run")
    from celltune.files import claim_run_dir
    from celltune.train import distributed as dist_utils

    if dist_utils.is_main_process():  # rank 0 owns (and alone writes) the run directory
        claim_run_dir(out)  # one owner per run directory; removes temp files of a killed run
    _check_resume(cfg, out, resume)
    return out, None


def _write_model_dir(model: nn.Module, vocab: Any, path: Path, task: Mapping[str, Any]) -> None:
    from celltune.model.checkpoint import save_model

    save_model(model, path, vocab)
    write_json_atomic(path / TASK_FILE, dict(task))


__all__ = ["open_run_dir"]
