"""Labelling a query: the fine-tuned CLS head (:func:`predict_labels`) or kNN label
transfer from a reference in any model's embedding space (:func:`map_labels`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

LABEL_KEY = "celltune_label"
CONFIDENCE_KEY = "celltune_confidence"
PROBA_KEY = "celltune_proba"
UNKNOWN = "unknown"


def _check_threshold(min_confidence: float) -> None:
    if not 0.0 <= min_confidence <= 1.0:
        raise InputError(f"--min-confidence must be in [0, 1] (got {min_confidence})")


def assign_labels(
    classes: list[str], best: np.ndarray, confidence: np.ndarray, min_confidence: float
) -> pd.Categorical:
    """Class names of ``best``; ``unknown`` where ``confidence < min_confidence``."""
    _check_threshold(min_confidence)
    names = np.asarray(classes, dtype=object)[best]
    names[confidence < min_confidence] = UNKNOWN
    cats = [*classes, UNKNOWN] if UNKNOWN not in classes else list(classes)
    return pd.Categorical(names, categories=cats)


def read_annotation_model(model_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """The model of a directory written by ``celltune annotate train`` and its task record."""
    from celltune.model.checkpoint import load_model

    mdir = Path(model_dir)
    task_path = mdir / "celltune_task.json"
    task = json.loads(task_path.read_text(encoding="utf-8")) if task_path.is_file() else {}
    if task.get("task") != "annotation":
        raise InputError(
            f"{mdir} is not an annotation model (no celltune_task.json with task "
            "'annotation'): train one with 'celltune annotate train', or use 'celltune map' "
            "to label cells zero-shot from any model directory"
        )
    return load_model(mdir, device="cpu"), task


def predict_labels(
    adata: AnnData,
    model_dir: str | Path,
    *,
    min_confidence: float = 0.0,
    batch_size: int = 64,
    device: str = "auto",
    layer: str | None = None,
    gene_column: str | None = None,
    quiet: bool = True,
) -> AnnData:
    """A copy of ``adata`` with ``obs['celltune_label']``, ``obs['celltune_confidence']``
    (softmax maximum) and ``obsm['celltune_proba']`` (cells × classes, columns in
    ``uns['celltune']['annotation']['classes']``); cells below ``min_confidence`` are
    labelled ``unknown``."""
    from torch.utils.data import DataLoader

    from celltune.data.dataset import CellDataset, TokenCollator
    from celltune.tasks.annotation.data import bin_query
    from celltune.tasks.annotation.train import class_probabilities
    from celltune.tasks.integration import resolve_embed_device

    _check_threshold(min_confidence)
    model, task = read_annotation_model(model_dir)
    dev = resolve_embed_device(device)
    genes, classes = list(task["genes"]), list(task["labels"])
    gcol = gene_column if gene_column is not None else task.get("gene_column")
    if gcol is not None and gcol not in adata.var.columns:
        gcol = None
    work, model_pos, n_matched = bin_query(
        adata,
        genes,
        gene_column=gcol,
        layer=layer,
        n_bins=int(task["n_bins"]),
        seed=int(task["seed"]),
        quiet=quiet,
    )
    gene_ids = np.asarray(model.vocab.match_genes(genes).ids, dtype=np.int64)[model_pos]
    ds = CellDataset(work, gene_ids, layer="X_binned")
    tok = task.get("tokens", {})
    coll = TokenCollator(
        n_genes=int(gene_ids.size),
        gene_ids=gene_ids,
        cls_id=model.vocab.cls_id,
        pad_id=model.vocab.pad_id,
        include_zero_gene=bool(tok.get("include_zero_gene", False)),
        max_seq_len=int(tok.get("max_seq_len", 3001)),
        mask_ratio=0.0,
        seed=int(task["seed"]),
    )
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=coll)
    probs, rows = class_probabilities(model.to(dev), loader, dev, quiet=quiet)
    proba = np.zeros_like(probs)
    proba[rows] = probs
    conf = proba.max(1)
    out = adata.copy()
    out.obs[LABEL_KEY] = assign_labels(classes, proba.argmax(1), conf, min_confidence)
    out.obs[CONFIDENCE_KEY] = conf.astype(np.float32)
    out.obsm[PROBA_KEY] = proba.astype(np.float32)
    _record(out, "annotation", str(model_dir), classes, min_confidence, n_matched, len(genes))
    return out


def _record(
    out: AnnData, how: str, model_dir: str, classes: list[str], thr: float, n: int, total: int
) -> None:
    info = dict(out.uns.get("celltune", {}))
    info["annotation"] = {
        "method": how,
        "model_dir": model_dir,
        "classes": list(classes),
        "min_confidence": float(thr),
        "n_genes_matched": int(n),
        "n_model_genes": int(total),
    }
    out.uns["celltune"] = info


#: Above this many reference cells the approximate index (pynndescent) is used; below it
#: scikit-learn's exact search is faster, because pynndescent's numba compilation alone
#: costs about a minute of CPU per process (measured: 64 s CPU for 750 cells).
APPROXIMATE_ABOVE = 50_000


def _neighbours(
    ref_emb: np.ndarray, query_emb: np.ndarray, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k neighbours in the reference of every query cell, and of every reference cell."""
    if ref_emb.shape[0] > APPROXIMATE_ABOVE:
        from pynndescent import NNDescent

        index = NNDescent(ref_emb, n_neighbors=max(k + 1, 15), random_state=seed, n_jobs=1)
        nn_idx, nn_dist = index.query(query_emb, k=k)
        return nn_idx, nn_dist, index.neighbor_graph[1][:, 1 : k + 1]
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(ref_emb)
    ref_dist, _ = index.kneighbors(ref_emb)
    nn_dist, nn_idx = index.kneighbors(query_emb, n_neighbors=k)
    return nn_idx, nn_dist, ref_dist[:, 1:]


def knn_transfer(
    ref_emb: np.ndarray,
    ref_labels: np.ndarray,
    query_emb: np.ndarray,
    *,
    k: int = 10,
    seed: int = 0,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Distance-weighted kNN vote (exact search, pynndescent for large references).

    Returns classes, the winning class per query cell, its confidence and the vote
    fractions. Confidence = vote fraction × exp(−d̄/σ): d̄ the cell's mean distance to its
    neighbours, σ the median neighbour distance *within* the reference, so a cell far from
    every reference cell gets a low confidence even when its neighbours agree.
    """
    if ref_emb.shape[0] <= k:
        raise InputError(
            f"the reference has {ref_emb.shape[0]} labelled cells; --k must be smaller"
        )
    classes = sorted(np.unique(ref_labels).tolist())
    codes = np.searchsorted(classes, ref_labels)
    nn_idx, nn_dist, ref_dist = _neighbours(ref_emb, query_emb, k, seed)
    sigma = max(float(np.median(ref_dist)), 1e-6)
    w = np.exp(-nn_dist / sigma)
    votes = np.zeros((query_emb.shape[0], len(classes)))
    np.add.at(votes, (np.repeat(np.arange(nn_idx.shape[0]), k), codes[nn_idx].ravel()), w.ravel())
    frac = votes / np.maximum(votes.sum(1, keepdims=True), 1e-12)
    best = frac.argmax(1)
    conf = frac.max(1) * np.exp(-nn_dist.mean(1) / sigma)
    return classes, best, conf, frac


def map_labels(
    query: AnnData,
    reference: AnnData,
    model_dir: str | Path,
    label_key: str,
    *,
    k: int = 10,
    min_confidence: float = 0.0,
    batch_size: int = 64,
    device: str = "auto",
    gene_column: str | None = None,
    quiet: bool = True,
) -> AnnData:
    """Reference mapping: embed query and reference with the same model (zero-shot from
    any scGPT-format directory) and transfer ``reference.obs[label_key]`` by kNN."""
    from celltune.tasks.annotation.data import labelled_cells
    from celltune.tasks.integration import EMBEDDING_KEY, embed

    _check_threshold(min_confidence)
    if k < 1:
        raise InputError(f"--k must be >= 1 (got {k})")
    labels, keep = labelled_cells(reference, label_key, "reference mapping (--label-key)")
    ref = reference[keep]
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "device": device,
        "gene_column": gene_column,
        "quiet": quiet,
    }
    ref_emb = embed(ref, model_dir, **kw).obsm[EMBEDDING_KEY]
    out = embed(query, model_dir, **kw)
    classes, best, conf, frac = knn_transfer(
        ref_emb, labels[keep].to_numpy(), out.obsm[EMBEDDING_KEY], k=k
    )
    out.obs[LABEL_KEY] = assign_labels(classes, best, conf, min_confidence)
    out.obs[CONFIDENCE_KEY] = conf.astype(np.float32)
    out.obsm[PROBA_KEY] = frac.astype(np.float32)
    n = int(out.uns["celltune"]["embed"]["n_genes_matched"])
    _record(out, "map", str(model_dir), classes, min_confidence, n, query.n_vars)
    out.uns["celltune"]["annotation"]["k"] = int(k)
    return out
