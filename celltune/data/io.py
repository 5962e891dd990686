"""Reading, writing and validating AnnData input (SPEC §1).

Every check here exists because a silent failure downstream is worse than a clear error up
front: scGPT happily trains on float "counts" or re-normalises log data (scGPT issues
#345, #174). Errors name the problem and the fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltune.errors import InputError
from celltune.files import atomic_path

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: SPEC §1 step 4 thresholds for "already log-transformed".
LOG_MAX = 30.0

NOT_RAW_HINT = (
    "if the data are already normalised/log-transformed, pass --not-raw (Python: data_is_raw=False)"
)


def check_h5ad_path(p: Path, fix: str = "") -> None:
    """Exists, is a file, and is HDF5 (what an ``.h5ad`` is); else one clear error."""
    if not p.exists():
        raise InputError(f"input file not found: {p}; check the path (cwd is {Path.cwd()})")
    if p.is_dir():
        raise InputError(f"{p} is a directory, not an .h5ad file; give the path of the file")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head != _HDF5_MAGIC:
        raise InputError(
            f"{p} is not an .h5ad (HDF5) file; convert it first, e.g. with scanpy "
            "(sc.read_10x_mtx / sc.read_csv / sc.read_loom, then adata.write_h5ad(...))" + fix
        )


def read_h5ad(path: str | os.PathLike[str], backed: bool = False) -> AnnData:
    """Read an ``.h5ad`` file, turning the usual h5py/anndata failures into one clear error."""
    import anndata

    p = Path(path)
    check_h5ad_path(p)
    try:
        return anndata.read_h5ad(p, backed="r" if backed else None)
    except Exception as err:  # h5py / anndata raise many different types here
        raise InputError(
            f"{p} is an HDF5 file but could not be read as AnnData ({type(err).__name__}: "
            f"{err}); re-write it with anndata (adata.write_h5ad) or check it is not truncated"
        ) from err


def write_h5ad(
    adata: AnnData, path: str | os.PathLike[str], compression: str | None = "gzip"
) -> None:
    """Write ``adata`` atomically: readers never see a half-written file.

    Matrices are gzip-compressed by default (``compression=None`` writes them raw): on the
    shipped 12,261-cell Kang file ``celltune preprocess`` writes 112.7 MB uncompressed.
    """
    from celltune.files import check_free_space

    check_free_space(path, estimated_h5ad_bytes(adata))  # h5py segfaults on a full disk
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression=compression)
    logger.info("wrote %s", path)


def estimated_h5ad_bytes(adata: AnnData) -> int:
    """Rough uncompressed size of ``adata`` on disk (matrices + 1 MB for metadata)."""

    def size(m: Any) -> int:
        if m is None:
            return 0
        if hasattr(m, "nnz") and hasattr(m, "data"):
            return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
        return int(getattr(m, "nbytes", 0))

    total = size(adata.X) if not adata.isbacked else 0
    for store in (adata.layers, adata.obsm, adata.varm, adata.obsp):
        total += sum(size(v) for v in store.values())
    return total + (1 << 20)


def get_matrix(adata: AnnData, layer: str | None = None) -> Any:
    """Return ``X`` or ``layers[layer]``, with an error listing the layers that exist."""
    if layer is None:
        if adata.X is None:
            raise InputError(
                f"the AnnData has no X matrix; choose a layer with --layer "
                f"(available: {_listing(adata.layers.keys())})"
            )
        return adata.X
    if layer not in adata.layers:
        raise InputError(
            f"layer {layer!r} not found; available layers: {_listing(adata.layers.keys())} "
            "(omit --layer to use X)"
        )
    return adata.layers[layer]


def require_obs_column(adata: AnnData, key: str, purpose: str) -> pd.Series:
    """Return ``adata.obs[key]``; a missing column is an error that lists the columns."""
    if key not in adata.obs.columns:
        raise InputError(
            f"obs column {key!r} (needed for {purpose}) not found; available obs columns: "
            f"{_listing(adata.obs.columns)}"
        )
    col = adata.obs[key]
    if col.isna().any():
        n = int(col.isna().sum())
        raise InputError(
            f"obs column {key!r} (needed for {purpose}) has {n:,} missing values; fill them "
            "(e.g. adata.obs[key] = adata.obs[key].astype(str).fillna('unknown')) or drop "
            "those cells"
        )
    return col


def _values(X: Any) -> np.ndarray:
    """The stored values of a dense or sparse matrix (for sparse: only the non-zeros)."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def check_raw_counts(X: Any, where: str = "X") -> None:
    """Raise ``InputError`` unless ``X`` holds finite, non-negative integer counts."""
    v = _values(X)
    if v.size == 0:
        return
    if not np.issubdtype(v.dtype, np.number) or np.issubdtype(v.dtype, np.complexfloating):
        raise InputError(f"{where} has non-numeric dtype {v.dtype}; store counts as numbers")
    if np.issubdtype(v.dtype, np.floating):
        finite = np.isfinite(v)
        if not finite.all():
            n_nan = int(np.isnan(v).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise InputError(
                f"{where} contains {n_nan:,} NaN and {n_inf:,} infinite values; raw counts "
                "must be finite: replace them (e.g. with 0) before preprocessing"
            )
    vmin = v.min()
    if vmin < 0:
        n_neg = int((v < 0).sum())
        raise InputError(
            f"{where} contains {n_neg:,} negative values (min {float(vmin):.4g}); raw counts "
            "cannot be negative (scaled/centred data?): use the raw count matrix, or "
            f"{NOT_RAW_HINT}"
        )
    if np.issubdtype(v.dtype, np.floating):
        frac = v != np.floor(v)
        if frac.any():
            example = float(v[np.argmax(frac)])
            raise InputError(
                f"{where} contains {int(frac.sum()):,} non-integer values (e.g. {example:.4g}) "
                f"but raw counts are required; {NOT_RAW_HINT}, or select the raw counts with "
                "--layer"
            )


def looks_log_transformed(X: Any) -> bool:
    """SPEC §1 step 4: max ≤ 30, min ≥ 0 and the smallest non-zero value < 1."""
    v = _values(X)
    if v.size == 0:
        return False
    v = v[np.isfinite(v)]
    nz = v[v != 0]
    if nz.size == 0:
        return False
    return bool(v.max() <= LOG_MAX and v.min() >= 0 and np.abs(nz).min() < 1)


def check_finite_nonnegative(X: Any, where: str = "X") -> None:
    """For already-normalised input: values must still be finite and non-negative (binning)."""
    v = _values(X)
    if v.size == 0:
        return
    if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
        raise InputError(
            f"{where} contains NaN or infinite values; replace them (e.g. with 0) first"
        )
    if v.min() < 0:
        raise InputError(
            f"{where} contains negative values (min {float(v.min()):.4g}); value binning needs "
            "non-negative expression: use log-normalised (not scaled/centred) data"
        )


def _listing(names: Any, limit: int = 30) -> str:
    names = [str(n) for n in names]
    if not names:
        return "(none)"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names):,} in all)" if len(names) > limit else "")
