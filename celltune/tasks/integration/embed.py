"""Embedding with a trained model: the model directory, the tokenisation it carries, and
writing every cell's embedding of a loader into an array (in memory or on disk)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from celltune.errors import InputError
from celltune.tasks.integration.config import TASK_FILE
from celltune.tasks.integration.model import _batch_labels_for

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger("celltune.tasks.integration")

#: Embeddings of a streamed run are written here first (an on-disk ``.npy``), then copied
#: into ``integrated.h5ad``.
EMBEDDING_FILE = "embedding.npy"


def embed_cells(
    model: nn.Module,
    dataset: Any,
    collator: Any,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    normalize: bool = True,
) -> np.ndarray:
    """Cell embeddings (cells × d, float32) in dataset order, L2-normalised as scGPT does.

    Eval mode, no masking, per-cell randomness (gene sub-sampling) keyed on the cell, and
    per-cell DSBN: a cell's embedding does not depend on the chunk it is computed in.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    out = np.zeros((len(dataset), model.config.d_model), dtype=np.float32)  # type: ignore[attr-defined]
    embed_into(out, model, loader, device=device, quiet=quiet, normalize=normalize)
    return out


def embed_into(
    out: np.ndarray,
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    position_of: Any = None,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    normalize: bool = True,
) -> None:
    """Write the embedding of every mini-batch of ``loader`` into rows of ``out``.

    ``out`` may be an on-disk ``np.memmap`` (streamed data: memory stays that of one
    mini-batch). Row = ``position_of(batch["cell_index"])`` (default: the cell index).
    """
    import torch
    from tqdm.auto import tqdm

    device = torch.device(device)
    model = model.to(device)
    was_training = model.training
    model.eval()
    total = len(loader) if hasattr(loader, "__len__") else None
    try:
        with torch.no_grad():
            for batch in tqdm(
                loader, desc="embedding", unit="batch", total=total, disable=quiet, leave=False
            ):
                idx = batch["cell_index"].numpy()
                if position_of is not None:
                    idx = position_of(idx)
                labels = _batch_labels_for(model, batch)
                emb = (
                    model.embed(  # type: ignore[attr-defined]
                        batch["gene_ids"].to(device),
                        batch["values"].to(device),
                        batch["padding_mask"].to(device),
                        batch_labels=None if labels is None else labels.to(device),
                    )
                    .float()
                    .cpu()
                    .numpy()
                )
                if normalize:
                    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
                out[idx] = emb
    finally:
        model.train(was_training)


def resolve_embed_device(device: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` → a torch device (clear error without a GPU)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA GPU is available; use cpu")
    return torch.device(device)


def load_embedding_model(
    model_dir: Path, allow_partial: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a directory (with its vocabulary) and its ``celltune_task.json``
    (``allow_partial``: accept weights that cover < 90% of the model, reported)."""
    from celltune.model.checkpoint import load_model

    model = load_model(model_dir, device="cpu", allow_partial=allow_partial)
    if model.vocab is None:
        raise InputError(f"{model_dir} has no vocab.json: a model directory needs one to embed")
    return model, _read_task_file(model_dir) or {}


def embedding_batch_categories(
    present: list[str] | None, task: Mapping[str, Any], mc: Any, model_dir: Path
) -> list[str] | None:
    """Batch category order for embedding: the run's own (``celltune_task.json``), then
    batches the model has not seen (pooled DSBN statistics). ``present=None``: no
    ``--batch-key``."""
    labels_needed = mc.use_batch_labels or mc.use_dsbn or mc.do_dab
    if present is None:
        if labels_needed:
            logger.info("no --batch-key: embedding without batch labels (pooled DSBN statistics)")
        return None
    known = task.get("batch_categories")
    if known is None:
        known = present
        if labels_needed:
            logger.warning(
                "%s has no %s: batch labels mapped by sorted order (%s) onto the "
                "model's %d batch slots",
                model_dir,
                TASK_FILE,
                ", ".join(f"{c}→{i}" for i, c in enumerate(known)),
                mc.num_batch_labels,
            )
    unseen = [c for c in present if c not in known]
    if unseen:
        logger.warning(
            "batches unknown to the model (%s): they use pooled DSBN statistics",
            ", ".join(unseen),
        )
    return [*known, *unseen]


def embedding_collator(
    model: nn.Module,
    task: Mapping[str, Any],
    gene_ids: np.ndarray,
    *,
    include_zero_gene: bool | None = None,
    max_seq_len: int | None = None,
    seed: int | None = None,
) -> Any:
    """The tokenisation of the run that wrote the model (``celltune_task.json``), else
    scGPT's ``embed_data`` conventions (non-zero genes, ≤ 1,200, ``<cls>`` = pad value)."""
    from celltune.data.dataset import TokenCollator

    tok = task.get("tokens", {})
    vocab = model.vocab  # type: ignore[attr-defined]
    zero_shot = not task
    pad_value = float(getattr(model.config, "pad_value", -2))  # type: ignore[attr-defined]
    return TokenCollator(
        n_genes=int(gene_ids.size),
        gene_ids=gene_ids,
        cls_id=vocab.cls_id,
        pad_id=vocab.pad_id,
        include_zero_gene=bool(
            tok.get("include_zero_gene", False) if include_zero_gene is None else include_zero_gene
        ),
        max_seq_len=int(max_seq_len or tok.get("max_seq_len", 1201)),
        pad_value=pad_value,
        cls_value=pad_value if zero_shot else 0,
        mask_ratio=0.0,
        seed=int(task.get("seed", 0) if seed is None else seed),
    )


def _read_task_file(model_dir: Path) -> dict[str, Any] | None:
    p = model_dir / TASK_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{p} is not valid JSON ({err}); delete it to embed zero-shot") from err


def memmap(path: Path, n: int, d: int) -> np.ndarray:
    """A zero-filled float32 ``.npy`` array on disk (``n x d``)."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))


__all__ = [
    "EMBEDDING_FILE",
    "embed_cells",
    "embed_into",
    "embedding_batch_categories",
    "embedding_collator",
    "load_embedding_model",
    "memmap",
    "resolve_embed_device",
]
