"""Resume support: input fingerprints and RNG states saved in ``checkpoint.pt``."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celltune.errors import CelltuneError, InputError

CHECKPOINT_FORMAT = "celltune.train.checkpoint/1"


def _load_state(path: Path, mmap: bool = False) -> dict:
    """The checkpoint's dict, or one error naming the file when it is not a celltune one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # corrupt / foreign file: say which and what to do
        raise CelltuneError(
            f"cannot resume from {path}: {err}; delete it to start from scratch"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CelltuneError(
            f"{path} is not a celltune training checkpoint; delete it or use another --out"
        )
    return state


def check_resume_input(path: Path, fingerprint: Mapping[str, Any]) -> None:
    """Refuse a resume on other data before the task writes anything (``config.yaml``):
    the checkpoint is memory-mapped, its tensors are not read."""
    if path.is_file():
        state = _load_state(path, mmap=True)
        check_fingerprint(state.get("fingerprint") or {}, fingerprint, path)


def read_checkpoint(path: Path, select_metric: str, fingerprint: Mapping[str, Any]) -> dict:
    """``checkpoint.pt`` of a resumable run, refused (with the fix) when it cannot be resumed:
    unreadable, not a celltune checkpoint, another ``select_metric`` or another input."""
    state = _load_state(path)
    if state["select_metric"] != select_metric:
        raise InputError(
            f"the checkpoint selected models on {state['select_metric']!r} but this run "
            f"selects on {select_metric!r}; use the same select_metric to resume"
        )
    check_fingerprint(state.get("fingerprint") or {}, fingerprint, path)
    return state


def check_fingerprint(saved: Mapping[str, Any], now: Mapping[str, Any], path: Path) -> None:
    """Refuse a resume whose input or vocabulary differs from the checkpointed run's."""
    differ = [k for k in sorted(set(saved) & set(now)) if saved[k] != now[k]]
    if differ:
        detail = "; ".join(f"{k}: {saved[k]} → {now[k]}" for k in differ)
        raise InputError(
            f"cannot resume from {path}: the input differs from the checkpointed run's "
            f"({detail}); resume with the original input file, or start a new run in "
            "another --out directory"
        )


def input_fingerprint(adata: Any, vocab: Any = None) -> dict[str, Any]:
    """Shape, file, name hashes of an AnnData and a hash of the vocabulary, for resume checks."""
    import hashlib
    import os

    def digest(names: Iterable[Any]) -> str:
        h = hashlib.sha256()
        for n in names:
            h.update(str(n).encode("utf-8") + b"\0")
        return h.hexdigest()[:16]

    fp: dict[str, Any] = {
        "shape": [int(adata.n_obs), int(adata.n_vars)],
        "obs_names": digest(adata.obs_names),
        "var_names": digest(adata.var_names),
    }
    filename = getattr(adata, "filename", None)
    if filename:
        fp["file"] = str(os.path.abspath(filename))
        fp["file_size"] = os.path.getsize(filename)
    if vocab is not None:
        mapping = getattr(vocab, "token_to_id", vocab)
        mapping = mapping() if callable(mapping) else mapping
        fp["vocab"] = digest(f"{k}={v}" for k, v in sorted(dict(mapping).items()))
    return fp


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states in a form ``torch.load(weights_only=True)`` accepts (no numpy arrays)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` needs tuples; a round trip may have turned them into lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
