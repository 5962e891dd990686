"""A prepared file read from disk for ``celltune perturb train --stream``.

:func:`read_prepared_stream` loads what is small (``obs``, ``var``, ``uns``: conditions,
splits, GEARS DE genes) into an AnnData without ``X``, and opens the file as a
:class:`~celltune.data.source.StoreSource`. :class:`StreamedRows` stands in for the
cells × model-genes matrix of :class:`~celltune.tasks.perturbation.data.PerturbationData`:
indexing it by rows reads only those rows (``StoreSource.take`` in contiguous spans of
``chunk_rows``), restricted to the model's genes exactly as the in-memory path restricts
the whole matrix, so each row holds the same float32 values on both paths.
:func:`check_prepared_stream` runs the in-memory checks on ``X`` over row chunks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from celltune.data.source import StoreSource
from celltune.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: rows per chunk of the checking pass and of row means
SCAN_ROWS = 8192


class StreamedRows:
    """Rows of a ``StoreSource`` on the model's columns (``take``), plus ``n_extra`` all-zero
    token-only columns; ``rows[i]`` / ``rows[array]`` read those rows as float32 CSR."""

    def __init__(
        self, source: StoreSource, take: np.ndarray, n_extra: int = 0, chunk_rows: int = 256
    ) -> None:
        self.source = source
        self.take = np.asarray(take, dtype=np.int64)
        self.n_extra = int(n_extra)
        self.chunk_rows = int(chunk_rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.source.n_obs, len(self.take) + self.n_extra)

    def _restrict(self, X: sp.csr_matrix) -> sp.csr_matrix:
        X = X[:, self.take].astype(np.float32)
        if self.n_extra:
            X = sp.hstack([X, sp.csr_matrix((X.shape[0], self.n_extra), dtype=np.float32)])
        return sp.csr_matrix(X)

    def __getitem__(self, rows: Any) -> sp.csr_matrix:
        r = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if r.size and (r.min() < 0 or r.max() >= self.source.n_obs):
            raise IndexError(f"rows outside [0, {self.source.n_obs:,})")
        uniq, inverse = np.unique(r, return_inverse=True)
        X = self._restrict(self.source.take(uniq, self.chunk_rows))
        return X if np.array_equal(uniq, r) else X[inverse]


def rows_mean(X: Any, rows: np.ndarray, chunk_rows: int = SCAN_ROWS) -> np.ndarray:
    """Mean of some rows of a CSR matrix or :class:`StreamedRows` (float64 sums over
    ``chunk_rows``-row parts, in row order: the same figure from memory and from disk)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    total = np.zeros(X.shape[1], dtype=np.float64)
    for a in range(0, rows.size, chunk_rows):
        part = X[rows[a : a + chunk_rows]]
        total += np.asarray(part.sum(axis=0, dtype=np.float64)).ravel()
    return (total / max(rows.size, 1)).astype(np.float32)


def read_prepared_stream(path: str | os.PathLike[str]) -> tuple[AnnData, StoreSource, str]:
    """``obs``/``var``/``uns`` of a prepared file in an AnnData without ``X``, the file as a
    ``StoreSource``, and its resolved path (the checks of ``load_prepared`` on metadata)."""
    import anndata
    from anndata.io import read_elem

    from celltune.data.gears.conditions import add_gears_obs, normalize_conditions
    from celltune.data.gears.de import DE_KEYS

    source = StoreSource(path)
    where = str(Path(path).resolve())
    fix = "Fix: run 'celltune perturb prepare RAW.h5ad --out DATA.h5ad' and train on DATA.h5ad."
    obs = read_elem(source.root["obs"])
    if "condition" not in obs.columns:
        raise InputError(f"{where} has no obs['condition'] column. {fix}")
    if "split" not in obs.columns:
        raise InputError(f"{where} has no obs['split'] (train/val/test) column. {fix}")
    cond = normalize_conditions(obs["condition"].values)
    if not np.array_equal(cond.values, obs["condition"].astype(str).values):
        raise InputError(f"{where}: conditions are not in GEARS spelling. {fix}")
    uns = read_elem(source.root["uns"]) if "uns" in source.root else {}
    meta = anndata.AnnData(obs=obs, var=source.var_frame(), uns=uns)
    if "gene_name" not in meta.var.columns:
        meta.var["gene_name"] = meta.var_names.astype(str)
    if not {"dose_val", "control", "condition_name", "cell_type"} <= set(meta.obs.columns):
        add_gears_obs(meta)
    missing = [k for k in DE_KEYS if k not in meta.uns]
    if missing:
        raise InputError(
            f"{where} has no GEARS DE genes (uns[{missing[0]!r}]); a streamed run reads them "
            "from the file instead of computing them over all cells. Fix: write them once with "
            "'celltune perturb prepare' (or train without --stream, which computes them)."
        )
    return meta, source, where


def check_prepared_stream(meta: AnnData, source: StoreSource, where: str) -> None:
    """``check_prepared`` on a file: the ``X`` checks over row chunks, the rest on obs."""
    from celltune.tasks.perturbation.config import CTRL

    fix = "Fix: run 'celltune perturb prepare RAW.h5ad --out DATA.h5ad' and train on DATA.h5ad."
    n_vals, all_int, vmin, vmax, nz_min = 0, True, np.inf, -np.inf, np.inf
    for a in range(0, source.n_obs, SCAN_ROWS):
        d = source.read_rows(a, min(a + SCAN_ROWS, source.n_obs)).data
        if not d.size:
            continue
        if not np.all(np.isfinite(d)):
            raise InputError(f"{where}: X holds NaN or infinite values. {fix}")
        n_vals += d.size
        all_int = all_int and bool(np.all(d == np.round(d)))
        vmin, vmax = min(vmin, float(d.min())), max(vmax, float(d.max()))
        nz = np.abs(d[d != 0])
        nz_min = min(nz_min, float(nz.min())) if nz.size else nz_min
    if n_vals and all_int and vmax > 30:
        raise InputError(
            f"{where}: X looks like raw counts (integers up to {vmax:g}); the model is trained "
            f"on normalised + log1p expression. {fix}"
        )
    if n_vals and not (vmax <= 30 and vmin >= 0 and nz_min < 1):
        logger.warning("%s: X does not look log1p-transformed; used as is", where)
    cond = meta.obs["condition"].astype(str).to_numpy()
    if not (cond == CTRL).any():
        raise InputError(
            f"{where} has no control cells (condition 'ctrl'): the model needs control cells "
            f"as inputs. {fix}"
        )
    split = meta.obs["split"].astype(str).to_numpy()
    if not ((cond == CTRL) & (split == "train")).any():
        raise InputError(
            f"{where}: no control cells in the training split; re-run 'celltune perturb "
            "prepare' (it puts 'ctrl' in train)"
        )


__all__ = [
    "StreamedRows",
    "check_prepared_stream",
    "read_prepared_stream",
    "rows_mean",
]
