"""Input checks of the integration task (before anything is written) and the split."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.errors import InputError
from celltune.tasks.integration.config import IntegrationConfig

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("celltune.tasks.integration")


def _gene_names(adata: AnnData, gene_column: str | None) -> pd.Index:
    if gene_column is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_column not in adata.var.columns:
        raise InputError(
            f"gene column {gene_column!r} is not in var (columns: "
            f"{', '.join(map(str, adata.var.columns)) or 'none'}); omit it to use var_names"
        )
    return pd.Index(adata.var[gene_column].astype(str))


def _batch_categories(col: pd.Series) -> list[str]:
    """Category order = the column's categories when categorical (user order), else sorted."""
    values = col.astype(str)
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = set(values.unique())
        return [str(c) for c in col.cat.categories if str(c) in present]
    return sorted(values.unique())


def check_integration_input(adata: AnnData, cfg: IntegrationConfig) -> list[str]:
    """Validate the obs columns against the config; returns the batch categories.

    A single batch makes DAB and DSBN meaningless, so it is an error unless both were
    switched off explicitly; tiny batches only warn (they train, but their DSBN statistics
    and metrics are noisy).
    """
    from celltune.data import io
    from celltune.data.validate import check_not_empty, check_unique_names

    check_not_empty(adata)  # the streamed path runs the same checks (check_source_names)
    check_unique_names(adata)
    if adata.n_obs < 20:
        raise InputError(
            f"only {adata.n_obs} cells: integration fine-tuning needs at least 20 "
            "(10% are held out for validation)"
        )
    assert cfg.data.batch_key is not None
    col = io.require_obs_column(adata, cfg.data.batch_key, "integration (--batch-key)")
    if cfg.data.label_key is not None:
        io.require_obs_column(adata, cfg.data.label_key, "evaluation (--label-key)")
    cats = _batch_categories(col)
    check_batch_counts(col.astype(str).value_counts(), cfg)
    return cats


def check_batch_counts(counts: pd.Series, cfg: IntegrationConfig) -> None:
    """Cells per batch (index = batch name) against the config's DAB/DSBN needs."""
    cats = [str(c) for c in counts.index]
    m = cfg.model
    if len(cats) < 2:
        if m.dab or m.dsbn:
            raise InputError(
                f"batch column {cfg.data.batch_key!r} holds a single batch ({cats[0]!r}): "
                "domain adaptation (DAB) and domain-specific batch norm (DSBN) need at least "
                "2 batches. Choose a column with several batches, or pass --no-dab --no-dsbn "
                "to fine-tune without them (nothing will be batch-corrected)"
            )
        logger.warning(
            "single batch %r: fine-tuning without DAB/DSBN as requested; batch metrics are skipped",
            cats[0],
        )
    small = counts[counts < cfg.data.min_batch_cells]
    if len(small):
        logger.warning(
            "batch(es) with fewer than %d cells: %s; their DSBN statistics and batch "
            "metrics will be noisy (consider merging or dropping them)",
            cfg.data.min_batch_cells,
            ", ".join(f"{k} ({v})" for k, v in small.items()),
        )


def stratified_split(
    batches: Iterable[Any], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation indices, ``fraction`` of every batch held out.

    Each batch with at least 2 cells contributes at least one validation cell, so the
    validation loss sees every domain (what DSBN/DAB are trained on).
    """
    b = np.asarray(list(batches)).astype(str)
    rng = np.random.default_rng([int(seed), 0x5E1])
    val: list[np.ndarray] = []
    for cat in sorted(np.unique(b)):
        idx = np.flatnonzero(b == cat)
        n_val = round(fraction * idx.size)
        n_val = min(max(n_val, 1), idx.size - 1) if idx.size >= 2 else 0
        val.append(rng.permutation(idx)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(b.size, dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def _subsample_cells(adata: AnnData, n: int, batch_key: str, seed: int) -> AnnData:
    """Seeded, batch-stratified subsample of ``n`` cells (for quick runs)."""
    if adata.n_obs <= n:
        return adata
    b = adata.obs[batch_key].astype(str).to_numpy()
    rng = np.random.default_rng([int(seed), 0xCE11])
    keep: list[np.ndarray] = []
    for cat in sorted(np.unique(b)):
        idx = np.flatnonzero(b == cat)
        k = max(1, round(n * idx.size / b.size))
        keep.append(rng.permutation(idx)[:k])
    sel = np.sort(np.concatenate(keep))
    logger.info("subsampled %d of %d cells (data.max_cells=%d)", sel.size, adata.n_obs, n)
    return adata[sel].copy()


__all__ = ["check_batch_counts", "check_integration_input", "stratified_split"]
