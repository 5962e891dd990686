"""A prepared (``celltune perturb prepare``) AnnData resolved against a model's gene list.

Checks that the input is prepared data, maps conditions to flag columns, and picks the
training rows of a split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltune.errors import InputError
from celltune.tasks.perturbation.config import CTRL
from celltune.tasks.perturbation.pairing import stable_cell_keys

if TYPE_CHECKING:
    from anndata import AnnData

    from celltune.data.source import StoreSource

logger = logging.getLogger(__name__)


@dataclass
class PerturbationData:
    """A prepared AnnData resolved against a model's gene list.

    ``cols_of[cond]``: columns flagged for ``cond`` (None when a gene is not in the gene
    list, i.e. the model cannot represent the perturbation). Columns ``>= n_measured`` are
    token-only columns of unmeasured perturbed genes (all zero in ``X``).
    """

    adata: AnnData
    X: Any  # CSR float32 in memory; ``StreamedRows`` (rows read on demand) when streamed
    genes: np.ndarray
    conditions: np.ndarray
    split: np.ndarray
    keys: np.ndarray
    cols_of: dict[str, np.ndarray | None]
    n_measured: int

    @property
    def control_rows(self) -> np.ndarray:
        return np.flatnonzero(self.conditions == CTRL)

    def placeable(self, cond: str) -> bool:
        """The model can flag every gene of ``cond`` (measured or as an extra token)."""
        return cond == CTRL or self.cols_of.get(cond) is not None

    def measured(self, cond: str) -> bool:
        """Every gene of ``cond`` is a measured gene (its flag sits on an input value)."""
        cols = self.cols_of.get(cond)
        return cond == CTRL or (cols is not None and bool((cols < self.n_measured).all()))

    def perturbations(self, split: str | None = None) -> list[str]:
        """Non-control conditions (in first-seen order), optionally of one split."""
        mask = self.conditions != CTRL
        if split is not None:
            mask &= self.split == split
        return [str(c) for c in pd.unique(self.conditions[mask])]


def check_prepared(adata: AnnData, source: str = "the data") -> None:
    """The train step needs ``celltune perturb prepare`` output; say so if it got anything else."""
    from celltune.data.io import looks_log_transformed

    fix = "Fix: run 'celltune perturb prepare RAW.h5ad --out DATA.h5ad' and train on DATA.h5ad."
    if "condition" not in adata.obs.columns:
        raise InputError(f"{source} has no obs['condition'] column. {fix}")
    if "split" not in adata.obs.columns:
        raise InputError(f"{source} has no obs['split'] (train/val/test) column. {fix}")
    X = adata.X
    data = np.asarray(X.data if sp.issparse(X) else np.asarray(X).ravel())
    if data.size and not np.all(np.isfinite(data)):
        raise InputError(f"{source}: X holds NaN or infinite values. {fix}")
    if data.size and np.all(data == np.round(data)) and float(data.max()) > 30:
        raise InputError(
            f"{source}: X looks like raw counts (integers up to {float(data.max()):g}); the "
            f"model is trained on normalised + log1p expression. {fix}"
        )
    if data.size and not looks_log_transformed(X):
        logger.warning("%s: X does not look log1p-transformed; used as is", source)
    cond = adata.obs["condition"].astype(str).to_numpy()
    if not (cond == CTRL).any():
        raise InputError(
            f"{source} has no control cells (condition 'ctrl'): the model needs control cells "
            f"as inputs. {fix}"
        )
    split = adata.obs["split"].astype(str).to_numpy()
    if not ((cond == CTRL) & (split == "train")).any():
        raise InputError(
            f"{source}: no control cells in the training split; re-run 'celltune perturb "
            "prepare' (it puts 'ctrl' in train)"
        )


def resolve_data(
    adata: AnnData,
    genes: Sequence[str],
    source: str = "the data",
    extra_genes: Sequence[str] = (),
    store: StoreSource | None = None,
    chunk_rows: int = 256,
) -> PerturbationData:
    """Restrict ``adata`` to ``genes`` (model gene list, in that order) and map conditions.

    ``extra_genes`` (unmeasured perturbed genes) become all-zero token-only columns after
    the measured ones. With ``store`` (``--stream``: ``adata`` holds obs/var/uns only) ``X``
    is a :class:`~celltune.tasks.perturbation.stream.StreamedRows` reading rows on demand.
    """
    from celltune.data.gears import gene_symbols, parse_condition

    symbols = np.asarray(gene_symbols(adata))
    pos = {g: i for i, g in reversed(list(enumerate(symbols)))}
    take = np.array([pos.get(g, -1) for g in genes], dtype=np.int64)
    if (take < 0).any():
        missing = [g for g, t in zip(genes, take, strict=True) if t < 0]
        raise InputError(
            f"{source} lacks {len(missing)} gene(s) of the model: {', '.join(missing[:10])}. "
            "Fix: evaluate on the data the model was trained on (same 'prepare' output)."
        )
    if store is not None:
        from celltune.tasks.perturbation.stream import StreamedRows

        X: Any = StreamedRows(store, take, len(extra_genes), chunk_rows)
    else:
        X = adata.X
        X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
        X = X[:, take].astype(np.float32)
        if len(extra_genes):
            X = sp.hstack([X, sp.csr_matrix((X.shape[0], len(extra_genes)), dtype=np.float32)])
            X = X.tocsr()
    conditions = adata.obs["condition"].astype(str).to_numpy()
    split = (
        adata.obs["split"].astype(str).to_numpy()
        if "split" in adata.obs.columns
        else np.full(adata.n_obs, "train", dtype=object)
    )
    all_genes = [*genes, *extra_genes]
    col = {g: i for i, g in enumerate(all_genes)}
    cols_of: dict[str, np.ndarray | None] = {}
    for cond in pd.unique(conditions):
        gs = parse_condition(str(cond))
        cols = [col.get(g) for g in gs]
        cols_of[str(cond)] = (
            None if any(c is None for c in cols) else np.asarray(cols, dtype=np.int64)
        )
    return PerturbationData(
        adata=adata,
        X=X,
        genes=np.asarray(all_genes, dtype=object),
        conditions=conditions,
        split=split,
        keys=stable_cell_keys(adata.obs_names),
        cols_of=cols_of,
        n_measured=len(genes),
    )


def read_prepared(data: AnnData | str | os.PathLike[str]) -> tuple[AnnData, str]:
    from celltune.data.gears import load_prepared

    if isinstance(data, (str, os.PathLike)):
        return load_prepared(data), str(Path(data).resolve())
    return data, "<in-memory AnnData>"


def dense_rows(X: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    return np.asarray(X[rows].toarray(), dtype=np.float32)


def de_cols(adata: AnnData, cond: str, genes: np.ndarray) -> np.ndarray:
    """Columns of ``top_non_dropout_de_20`` of ``cond`` (GEARS de_idx), in model gene order."""
    de = adata.uns.get("top_non_dropout_de_20", {})
    names = adata.obs.loc[adata.obs["condition"].astype(str) == cond, "condition_name"]
    if names.empty:
        return np.array([], dtype=np.int64)
    ids = de.get(str(names.iloc[0]))
    if ids is None:
        return np.array([], dtype=np.int64)
    id_to_sym = dict(
        zip(adata.var_names.astype(str), adata.var["gene_name"].astype(str), strict=True)
    )
    pos = {g: i for i, g in enumerate(genes)}
    cols = [pos.get(id_to_sym.get(str(g), str(g))) for g in np.asarray(ids).astype(str)]
    return np.asarray([c for c in cols if c is not None], dtype=np.int64)


def pick_rows(
    pdata: PerturbationData,
    split: str,
    cap: int | None,
    seed: int,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Target rows of one split with flag columns; unplaceable perturbations and the rows
    in ``exclude`` (held-out validation cells) left out, then ``cap`` cells per condition."""
    excluded = np.zeros(len(pdata.conditions), dtype=bool)
    if exclude is not None:
        excluded[exclude] = True
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    skipped: list[str] = []
    rng = np.random.default_rng([seed, 11])
    for cond in pd.unique(pdata.conditions[pdata.split == split]):
        cond = str(cond)
        if not pdata.placeable(cond):
            skipped.append(cond)
            continue
        r = np.flatnonzero((pdata.conditions == cond) & (pdata.split == split) & ~excluded)
        if cap is not None and len(r) > cap:
            r = np.sort(rng.choice(r, cap, replace=False))
        rows.append(r)
        c = np.array([], dtype=np.int64) if cond == CTRL else pdata.cols_of[cond]
        cols.extend([c] * len(r))  # type: ignore[list-item]
    all_rows = np.concatenate(rows) if rows else np.array([], dtype=np.int64)
    return all_rows, cols, skipped
