"""``celltune pretrain`` as a function: label-free training on many files, scGPT output.

::

    open files ─ --init model ─ vocabulary (union / --vocab / --init extended) ─ run dir
        ─ config.yaml ─ per-file split + streamed loaders ─ train (Trainer) ─ model/

Every step that integration also has is integration's own code: the config tree and its
checks, the run directory (lock, manifest, resume checks), the collators, the model and
its objective, :class:`celltune.train.Trainer` and the model-directory writer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celltune.tasks.config import dump_config
from celltune.tasks.integration.rundir import _write_model_dir, open_run_dir
from celltune.tasks.integration.train import (
    load_pretrained,
    private_config,
    train_integration_model,
)
from celltune.tasks.pretrain.config import PretrainConfig
from celltune.tasks.pretrain.genes import build_vocab
from celltune.tasks.pretrain.inputs import (
    PretrainInputs,
    display_names,
    file_genes,
    open_sources,
)

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger("celltune.tasks.pretrain")

#: The model directory inside the run directory.
MODEL_DIR = "model"


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: the history, the model directory and the sizes."""

    history: Any
    model_dir: Path | None
    vocab: Any
    n_cells: int
    train_seconds: float


def resolve_pretrain_config(config: PretrainConfig | Mapping[str, Any] | None) -> PretrainConfig:
    """A validated private copy of ``config`` (no from-scratch recipe: pretraining keeps
    its own defaults)."""
    cfg = private_config(config, PretrainConfig)
    cfg.validate()
    return cfg


def widen_vocab(pretrained: nn.Module, vocab: Any) -> nn.Module:
    """``pretrained`` with an embedding table of ``vocab``'s size: every old id keeps its
    row (ids are only appended), new genes start from the model's own initialisation."""
    import torch

    from celltune.model.checkpoint import load_weights
    from celltune.model.model import CellTransformer

    old = pretrained.config  # type: ignore[attr-defined]
    if vocab.ntoken == old.ntoken:
        return pretrained
    wide = CellTransformer(dataclasses.replace(old, ntoken=vocab.ntoken), vocab=vocab)
    state = pretrained.state_dict()
    load_weights(wide, state)  # everything but the embedding table (its shape differs)
    with torch.no_grad():
        emb = wide.encoder.embedding.weight
        emb[: old.ntoken] = state["encoder.embedding.weight"]
    logger.info("--init embedding table widened from %d to %d tokens", old.ntoken, vocab.ntoken)
    return wide


def pretrain(
    files: Sequence[str | os.PathLike[str]],
    config: PretrainConfig | Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
) -> PretrainResult:
    """Pretrain on ``files`` (``.h5ad``/``.zarr``, streamed) with the label-free objective.

    ``config``: a :class:`PretrainConfig` (or a nested dict of its shape);
    ``config.model.pretrained`` continues a model (``--init``). ``out_dir``: where
    ``config.yaml``, ``history.csv``, ``checkpoint.pt`` and ``model/`` go (None: a
    temporary directory, nothing kept). ``resume``: continue from ``out_dir/checkpoint.pt``.
    """
    from celltune.train import distributed as dist_utils

    t_start = time.perf_counter()
    dist_utils.init_distributed()
    cfg = resolve_pretrain_config(config)
    sources = open_sources(files, cfg.data.layer)
    names = display_names(sources)
    genes = {n: file_genes(s, cfg.data.gene_column) for n, s in zip(names, sources, strict=True)}
    init = load_pretrained(cfg)  # sets cfg.model to its architecture (resume compares it)
    vocab, per_file = build_vocab(
        genes, cfg.pretrain, None if init is None else init.vocab, cfg.model.pretrained
    )
    if init is not None:
        init = widen_vocab(init, vocab)
    inputs = PretrainInputs(sources, cfg)
    out, tmp_dir = open_run_dir(cfg, out_dir, resume)
    if out_dir is not None and dist_utils.is_main_process():
        dump_config(cfg, out / "config.yaml", header="celltune pretrain: resolved configuration")
    train_loader, val_loader = inputs.loaders(vocab, per_file)
    _trainer, history, model, seconds = train_integration_model(
        cfg, vocab, 1, init, train_loader, val_loader, out, resume, inputs.fingerprint(vocab)
    )
    model_dir = None
    if out_dir is not None and dist_utils.is_main_process():
        model_dir = out / MODEL_DIR
        _write_model_dir(model.cpu(), vocab, model_dir, _task_record(cfg, sources))
        logger.info("wrote %s in %.1f s", model_dir, time.perf_counter() - t_start)
    dist_utils.barrier()
    if tmp_dir is not None:
        tmp_dir.cleanup()
    return PretrainResult(history, model_dir, vocab, inputs.n_cells, seconds)


def _task_record(cfg: PretrainConfig, sources: Sequence[Any]) -> dict[str, Any]:
    """``celltune_task.json``: what ``embed`` needs to tokenise as this run did."""
    return {
        "task": "pretrain",
        "files": [str(s.path) for s in sources],
        "gene_column": cfg.data.gene_column,
        "n_bins": cfg.data.n_bins,
        "seed": cfg.train.seed,
        "tokens": dataclasses.asdict(cfg.tokens),
    }


__all__ = ["MODEL_DIR", "PretrainResult", "pretrain", "resolve_pretrain_config", "widen_vocab"]
