"""``celltune embed``: zero-shot (or fine-tuned) embeddings of a data set, from either source.

:func:`embed` embeds an AnnData in memory and returns a copy with ``obsm[key]``;
:func:`embed_file` streams an on-disk file (``--stream``) and writes ``obs``, ``var`` and
the embedding (no ``X``). Both answer the same questions of their
:class:`~celltune.data.source.CellSource` in :func:`_setup` (genes matched to the model's
vocabulary, batch categories, binning seed) and tokenise with the same collator, so a
cell gets the same embedding either way (tested).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.errors import InputError
from celltune.tasks.integration.checks import _batch_categories
from celltune.tasks.integration.config import EMBEDDING_KEY
from celltune.tasks.integration.embed import (
    EMBEDDING_FILE,
    embed_cells,
    embed_into,
    embedding_batch_categories,
    embedding_collator,
    load_embedding_model,
    memmap,
    resolve_embed_device,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from torch import nn

    from celltune.data.source import CellSource

logger = logging.getLogger(__name__)


@dataclass
class _Setup:
    """What embedding a source with a model directory needs (see :func:`_setup`)."""

    model: nn.Module
    task: dict[str, Any]
    matched: np.ndarray  # bool per column of the source
    gene_ids: np.ndarray  # vocab id per matched column
    n_matched: int
    batch_cats: list[str] | None
    n_bins: int
    seed: int


def _setup(
    source: CellSource,
    model_dir: Path,
    batch_key: str | None,
    gene_column: str | None,
    seed: int | None = None,
    allow_partial: bool = False,
) -> _Setup:
    """Load the model; match the source's genes to its vocabulary (``gene_column``, else
    the run's own, else ``var_names``); order the batch categories as the run did."""
    model, task = load_embedding_model(model_dir, allow_partial)
    vocab, mc = model.vocab, model.config
    if gene_column is None:
        gene_column = task.get("gene_column")
        if gene_column is not None and gene_column not in source.var_frame().columns:
            gene_column = None
    genes = source.var_names() if gene_column is None else source.var_column(gene_column)
    match = vocab.match_genes([str(g) for g in genes])  # logs the count
    matched = np.asarray(match.matched, dtype=bool)
    run_genes = task.get("genes")
    if run_genes:  # the run's HVGs: a pretrained vocabulary holds many more of the file's genes
        matched &= np.isin(np.asarray(genes, dtype=str), np.asarray(run_genes, dtype=str))
        logger.info(
            "%d of the run's %d genes found in the data", int(matched.sum()), len(run_genes)
        )
    present = None
    if batch_key is not None:
        col = source.obs_column(batch_key, "batch-aware embedding (--batch-key)")
        present = _batch_categories(col)
    return _Setup(
        model=model,
        task=task,
        matched=matched,
        gene_ids=np.asarray(match.ids, dtype=np.int64)[matched],
        n_matched=int(matched.sum()),
        batch_cats=embedding_batch_categories(present, task, mc, model_dir),
        n_bins=int(task.get("n_bins", getattr(mc, "n_input_bins", 51) or 51)),
        seed=int(task.get("seed", 0) if seed is None else seed),
    )


def _record(model_dir: Path, key: str, s: _Setup, batch_key: str | None) -> dict[str, Any]:
    return {
        "model_dir": str(model_dir),
        "key": key,
        "n_genes_matched": s.n_matched,
        "batch_key": batch_key,
        "zero_shot_tokenisation": not s.task,
    }


def embed(
    adata: AnnData,
    model_dir: str | Path,
    *,
    batch_key: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    key: str = EMBEDDING_KEY,
    layer: str | None = None,
    gene_column: str | None = None,
    max_seq_len: int | None = None,
    include_zero_gene: bool | None = None,
    seed: int | None = None,
    quiet: bool = False,
    allow_partial: bool = False,
) -> AnnData:
    """Zero-shot cell embeddings from any scGPT-format model directory.

    Returns a copy of ``adata`` with ``obsm[key]`` (cells × d_model, L2-normalised).
    Genes are matched to the model's vocabulary by name (``gene_column`` or ``var_names``)
    and binned per cell (SPEC §1: binning raw counts equals binning normalised+log1p
    values). A directory written by ``celltune integrate`` carries its tokenisation and
    batch categories (``celltune_task.json``), so the fine-tuned run's embedding is
    reproduced; other directories follow scGPT's ``embed_data``: non-zero genes only, at
    most 1,200 genes, ``<cls>`` value = ``pad_value``. Cells whose batch is unknown to
    the model (or no ``batch_key``) use pooled DSBN statistics and no batch label.
    A model directory whose weights cover < 90% of the model is refused unless
    ``allow_partial`` (docs/reliability.md).
    """
    import anndata

    from celltune.data import io
    from celltune.data.binning import bin_matrix, cell_keys
    from celltune.data.dataset import CellDataset
    from celltune.data.source import AnnDataSource

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1 (got {batch_size})")
    mdir = Path(model_dir)
    dev = resolve_embed_device(device)
    s = _setup(AnnDataSource(adata), mdir, batch_key, gene_column, seed, allow_partial)
    X = io.get_matrix(adata, layer)
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    X = X[:, s.matched]
    io.check_finite_nonnegative(X, "X" if layer is None else f"layer {layer!r}")
    binned = bin_matrix(X, s.n_bins, s.seed, cell_keys(adata.obs_names), quiet=quiet)
    work = anndata.AnnData(X=binned, obs=pd.DataFrame(index=adata.obs_names.copy()))
    work.layers["X_binned"] = binned
    if batch_key is not None:
        work.obs[batch_key] = adata.obs[batch_key].astype(str).to_numpy()
    ds = CellDataset(
        work, s.gene_ids, layer="X_binned", batch_key=batch_key, batch_categories=s.batch_cats
    )
    collator = embedding_collator(
        s.model,
        s.task,
        s.gene_ids,
        include_zero_gene=include_zero_gene,
        max_seq_len=max_seq_len,
        seed=s.seed,
    )
    emb = embed_cells(s.model, ds, collator, batch_size=batch_size, device=dev, quiet=quiet)
    out = adata.copy()
    out.obsm[key] = emb
    out.uns.setdefault("celltune", {})
    out.uns["celltune"] = {**dict(out.uns["celltune"]), "embed": _record(mdir, key, s, batch_key)}
    return out


def embed_file(
    path: str | Path,
    model_dir: str | Path,
    out_path: str | Path,
    *,
    batch_key: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    key: str = EMBEDDING_KEY,
    layer: str | None = None,
    gene_column: str | None = None,
    max_seq_len: int | None = None,
    chunk_size: int = 1024,
    buffer_chunks: int = 8,
    quiet: bool = False,
    allow_partial: bool = False,
) -> Path:
    """:func:`embed` streamed from disk (``.h5ad`` or ``.zarr``), written to ``out_path``.

    The output ``.h5ad`` holds the input's ``obs`` and ``var`` and ``obsm[key]``, but no
    ``X`` (the expression stays in the input file). Tokenisation, batch handling and the
    embedding of each cell are those of ``embed`` (tested to match). Memory: one window of
    ``chunk_size x buffer_chunks`` rows, the model, ``obs`` and the output embedding.
    """
    import anndata

    from celltune.data import io
    from celltune.data.source import StoreSource
    from celltune.data.streaming import StreamingCellDataset

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1 (got {batch_size})")
    path, mdir, out_path = Path(path), Path(model_dir), Path(out_path)
    dev = resolve_embed_device(device)
    src = StoreSource(path, layer)
    s = _setup(src, mdir, batch_key, gene_column, allow_partial=allow_partial)
    ds = StreamingCellDataset(
        src,
        s.gene_ids,
        var_subset=np.flatnonzero(s.matched),
        batch_key=batch_key,
        batch_categories=s.batch_cats,
        batch_size=batch_size,
        chunk_size=chunk_size,
        buffer_chunks=buffer_chunks,
        shuffle=False,
        group_by_batch=False,
        n_bins=s.n_bins,
        seed=s.seed,
        num_replicas=1,
        rank=0,
    )
    collator = embedding_collator(s.model, s.task, s.gene_ids, max_seq_len=max_seq_len)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="celltune-embed-", dir=out_path.parent) as tmp:
        emb = memmap(Path(tmp) / EMBEDDING_FILE, src.n_obs, s.model.config.d_model)  # type: ignore[attr-defined]
        embed_into(emb, s.model, ds.loader(collator), device=dev, quiet=quiet)
        emb.flush()
        var = pd.DataFrame(index=src.var_names().astype(str))
        out = anndata.AnnData(obs=src.obs_frame(), var=var)
        out.obsm[key] = np.asarray(emb)
        record = {**_record(mdir, key, s, batch_key), "input": str(path), "stream": True}
        out.uns["celltune"] = {"embed": record}
        io.write_h5ad(out, out_path)
        del emb
    src.close()
    return out_path


__all__ = ["embed", "embed_file"]
