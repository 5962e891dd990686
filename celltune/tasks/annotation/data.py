"""Reference and query data for annotation: input checks, preprocessing, binning of a
query onto the genes the model was trained on, class-balanced sampling."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

    from celltune.tasks.annotation.config import AnnotationConfig

logger = logging.getLogger(__name__)

#: Below this fraction of the model's genes found in a query, predictions are warned about.
LOW_OVERLAP = 0.5


def gene_names(adata: AnnData, gene_column: str | None) -> pd.Index:
    """Gene symbols of ``adata``: ``var_names`` or the named ``var`` column."""
    if gene_column is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_column not in adata.var.columns:
        raise InputError(
            f"gene column {gene_column!r} is not in var (columns: "
            f"{', '.join(map(str, adata.var.columns)) or 'none'}); omit it to use var_names"
        )
    return pd.Index(adata.var[gene_column].astype(str))


def labelled_cells(adata: AnnData, label_key: str, purpose: str) -> tuple[pd.Series, np.ndarray]:
    """The label column (as strings) and a mask of cells that carry a label.

    NaN / empty labels are not a class: those cells are left out with a warning.
    """
    if label_key not in adata.obs.columns:
        cols = ", ".join(map(str, adata.obs.columns)) or "none"
        raise InputError(
            f"obs column {label_key!r} (needed for {purpose}) not found; available obs "
            f"columns: {cols}. Pass the column with the cell types as --label-key"
        )
    col = adata.obs[label_key]
    missing = (
        col.isna().to_numpy() | col.astype(str).str.strip().isin(["", "nan", "NaN"]).to_numpy()
    )
    if missing.all():
        raise InputError(
            f"obs column {label_key!r} holds no labels (all {adata.n_obs:,} are NaN/empty): "
            "choose the column with the cell types (--label-key)"
        )
    if missing.any():
        logger.warning(
            "%s of %s cells have no %r label (NaN/empty): they are left out of %s",
            f"{int(missing.sum()):,}",
            f"{adata.n_obs:,}",
            label_key,
            purpose,
        )
    return col.astype(str), ~missing


def check_reference(adata: AnnData, cfg: AnnotationConfig) -> AnnData:
    """Validate a labelled reference; returns the labelled cells (a view or the input)."""
    if not adata.obs_names.is_unique:
        raise InputError(
            "cell names (obs_names) are not unique, but celltune keys every cell's random "
            "draws on its name: call adata.obs_names_make_unique() first"
        )
    labels, keep = labelled_cells(adata, cfg.label_key, "annotation training (--label-key)")
    if cfg.batch_key is not None:
        from celltune.data import io

        io.require_obs_column(adata, cfg.batch_key, "domain adaptation (--batch-key)")
    counts = labels[keep].value_counts()
    if len(counts) < 2:
        raise InputError(
            f"obs column {cfg.label_key!r} has a single class ({counts.index[0]!r}): a "
            "classifier needs at least 2 cell types"
        )
    small = counts[counts < cfg.min_class_cells]
    if len(small):
        logger.warning(
            "cell type(s) with fewer than %d cells: %s. They are kept and trained on (a class "
            "with one cell gets no validation cell), but their predictions and F1 are "
            "unreliable; merge or drop them for a cleaner model",
            cfg.min_class_cells,
            ", ".join(f"{k} ({v})" for k, v in small.items()),
        )
    sub = adata if keep.all() else adata[keep]
    if sub.n_obs < 20:
        raise InputError(f"only {sub.n_obs} labelled cells: annotation training needs >= 20")
    return sub


def match_query_genes(
    query_genes: Sequence[str], model_genes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the query that hold the model's genes, and the matching model positions.

    Logs "matched n/N genes"; an error when nothing matches, a warning below 50%.
    """
    pos = {g: i for i, g in enumerate(query_genes)}
    model_pos = np.asarray([i for i, g in enumerate(model_genes) if g in pos], dtype=np.int64)
    cols = np.asarray([pos[model_genes[i]] for i in model_pos], dtype=np.int64)
    n, total = model_pos.size, len(model_genes)
    if n == 0:
        raise InputError(
            f"none of the model's {total:,} genes is in the query (e.g. "
            f"{', '.join(list(model_genes)[:3])}): are the gene names of the same kind (symbols "
            "vs Ensembl IDs)? Pass --gene-column to use another var column"
        )
    logger.info("matched %s/%s of the model's genes in the query", f"{n:,}", f"{total:,}")
    if n < LOW_OVERLAP * total:
        logger.warning(
            "only %s of the model's %s genes (%.0f%%) are in the query: predictions rest on "
            "few genes and may be poor; check the gene names or use a model trained on "
            "genes the query has",
            f"{n:,}",
            f"{total:,}",
            100 * n / total,
        )
    return cols, model_pos


def bin_query(
    adata: AnnData,
    model_genes: Sequence[str],
    *,
    gene_column: str | None,
    layer: str | None,
    n_bins: int,
    seed: int,
    quiet: bool = True,
) -> tuple[AnnData, np.ndarray, int]:
    """The query binned over the model's genes it has (SPEC §1 binning is per cell and
    invariant to normalisation, so raw or normalised input gives the same bins).

    Returns a bare AnnData with ``layers['X_binned']``, the positions of its columns in
    ``model_genes`` and the number matched.
    """
    import anndata

    from celltune.data import io
    from celltune.data.binning import bin_matrix, cell_keys

    cols, model_pos = match_query_genes(list(gene_names(adata, gene_column)), list(model_genes))
    X = io.get_matrix(adata, layer)
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    X = X[:, cols]
    io.check_finite_nonnegative(X, "X" if layer is None else f"layer {layer!r}")
    binned = bin_matrix(X, n_bins, seed, cell_keys(adata.obs_names), quiet=quiet)
    work = anndata.AnnData(X=binned, obs=pd.DataFrame(index=adata.obs_names.copy()))
    work.layers["X_binned"] = binned
    return work, model_pos, int(model_pos.size)


def balanced_batch_sampler(labels: np.ndarray, batch_size: int, seed: int) -> Any:
    """Mini-batches drawn with probability 1/(class size): every class equally often.

    An epoch has as many cells as the training set; ``set_epoch`` reseeds the draw so a
    resumed run repeats the same batches.
    """
    import torch
    from torch.utils.data import BatchSampler, WeightedRandomSampler

    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)

    class _Sampler(BatchSampler):
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(seed)
            inner = WeightedRandomSampler(
                weights, len(labels), replacement=True, generator=self.generator
            )
            super().__init__(inner, batch_size, drop_last=False)

        def set_epoch(self, epoch: int) -> None:
            self.generator.manual_seed(seed * 100_003 + epoch)

    return _Sampler()
