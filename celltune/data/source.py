"""Where cells come from: one small interface over an in-memory AnnData and an on-disk store.

Every task asks a data set the same few questions: how many cells and genes, the gene
and cell names, one ``obs`` column (without loading ``X``), a seeded sample of rows, and
the expression of some rows as CSR. :class:`CellSource` answers them;

- :class:`AnnDataSource` over an ``AnnData`` in memory (or opened backed),
- :class:`StoreSource` over a file on disk: an ``.h5ad`` (HDF5) or a ``.zarr`` store, read
  with anndata's own element readers (``anndata.io.sparse_dataset`` for row-range CSR reads,
  ``anndata.io.read_elem`` for one ``obs``/``var`` column), never the whole matrix.

``open_source(x)`` turns an AnnData, a path or a source into a source. Row reads are by
contiguous range (:meth:`CellSource.read_rows`) or by sorted row numbers
(:meth:`CellSource.take`, which groups them into contiguous reads of ``chunk_rows`` rows).
A ``StoreSource`` opens its file lazily and never pickles the handle, so every DataLoader
worker (a separate process) opens its own.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltune.data.io import check_h5ad_path
from celltune.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData


class CellSource(abc.ABC):
    """Read-only access to the cells of one data set (see the module docstring).

    Subclasses give the primitives (shape, names, one column, a row range); the shared
    logic (category codes, seeded samples, row selections, small in-memory subsets) is
    written once here.
    """

    #: Where the data lives, for error messages ("" for an in-memory AnnData).
    where: str = ""

    # -- primitives ----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """``(n_obs, n_vars)``."""

    @abc.abstractmethod
    def var_names(self) -> pd.Index:
        """Gene names (small: read whole)."""

    @abc.abstractmethod
    def var_frame(self) -> pd.DataFrame:
        """The whole ``var`` table (small)."""

    @abc.abstractmethod
    def obs_keys(self) -> list[str]:
        """Names of the ``obs`` columns."""

    @abc.abstractmethod
    def _obs_column(self, key: str) -> Any:
        """The values of one present ``obs`` column (Categorical or array)."""

    @abc.abstractmethod
    def obs_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Cell names of rows ``start:stop`` (object array)."""

    @abc.abstractmethod
    def obs_frame(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """The ``obs`` table of ``rows`` (all when None)."""

    @abc.abstractmethod
    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR float32 (one contiguous read)."""

    def close(self) -> None:  # noqa: B027 - an in-memory source holds no handle
        """Release file handles (reopened on the next read)."""

    # -- shared --------------------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]

    def var_column(self, key: str) -> pd.Series:
        """A ``var`` column (e.g. gene symbols when ``var_names`` are Ensembl ids)."""
        var = self.var_frame()
        if key not in var.columns:
            raise InputError(
                f"var column {key!r} not found{self._in()}; available: "
                f"{', '.join(map(repr, var.columns)) or '(none)'}"
            )
        return var[key].reset_index(drop=True)

    def obs_column(self, key: str, purpose: str = "this task") -> pd.Series:
        """One ``obs`` column as a Series (categorical kept), without loading ``X``."""
        if key not in self.obs_keys():
            raise InputError(
                f"obs column {key!r} (needed for {purpose}) not found{self._in()}; available "
                f"obs columns: {', '.join(map(repr, self.obs_keys())) or '(none)'}"
            )
        col = pd.Series(self._obs_column(key))
        if col.isna().any():
            raise InputError(
                f"obs column {key!r} (needed for {purpose}) has {int(col.isna().sum()):,} "
                "missing values; fill them (e.g. adata.obs[key].astype(str)) or drop those cells"
            )
        return col

    def obs_codes(
        self, key: str, categories: Sequence[Any] | None, purpose: str
    ) -> tuple[np.ndarray, list[Any]]:
        """Integer codes of an obs column (compact dtype) and their category order.

        Same convention as ``CellDataset``: the given ``categories``; else a categorical
        column's own categories; else the sorted unique values.
        """
        col = self.obs_column(key, purpose)
        if categories is None:
            cat = col if isinstance(col.dtype, pd.CategoricalDtype) else col.astype(str)
            cat = cat.astype("category")
            return compact_codes(np.asarray(cat.cat.codes)), list(cat.cat.categories)
        cats = list(categories)
        values = col.astype(str)
        codes = pd.Categorical(values, categories=[str(c) for c in cats]).codes
        if (codes < 0).any():
            unknown = sorted({str(v) for v in values[codes < 0]})[:10]
            raise InputError(
                f"obs column {key!r} has values not in the given categories: {unknown}; "
                "pass categories that include them or drop those cells"
            )
        return compact_codes(np.asarray(codes)), cats

    def sample(self, n: int, seed: int = 0, batch_labels: np.ndarray | None = None) -> np.ndarray:
        """Sorted, seeded row sample of ``n`` cells (stratified by ``batch_labels``)."""
        return sample_rows(self.n_obs, n, seed, batch_labels)

    def take(self, rows: Sequence[int] | np.ndarray, chunk_rows: int = 4096) -> sp.csr_matrix:
        """Rows by (strictly increasing) row number as CSR float32, read in contiguous
        spans of at most ``chunk_rows`` rows, so memory is that of the rows asked for."""
        r = self._check_rows(rows)
        parts = [self.read_rows(lo, hi)[sel - lo] for sel, lo, hi in _spans(r, chunk_rows)]
        if not parts:
            return sp.csr_matrix((0, self.n_vars), dtype=np.float32)
        return sp.csr_matrix(sp.vstack(parts, format="csr"), dtype=np.float32)

    def take_names(self, rows: np.ndarray, chunk_rows: int = 4096) -> np.ndarray:
        """Cell names of sorted row numbers (read in the same spans as :meth:`take`)."""
        r = self._check_rows(rows)
        parts = [self.obs_names(lo, hi)[sel - lo] for sel, lo, hi in _spans(r, chunk_rows)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=object)

    def to_anndata(
        self, rows: Sequence[int] | np.ndarray, obs_keys: Sequence[str] = (), chunk_rows: int = 4096
    ) -> AnnData:
        """An in-memory AnnData of some rows (e.g. a sample to choose HVGs on): only those
        rows and the named obs columns are read."""
        import anndata

        r = np.unique(np.asarray(rows, dtype=np.int64))
        if r.size == 0 or r[0] < 0 or r[-1] >= self.n_obs:
            raise InputError(f"rows must be non-empty row numbers in [0, {self.n_obs:,})")
        X = self.take(r, chunk_rows)
        obs = pd.DataFrame(index=pd.Index(self.take_names(r, chunk_rows).astype(str)))
        for key in obs_keys:
            codes, cats = self.obs_codes(key, None, f"obs column {key!r}")
            obs[key] = pd.Categorical.from_codes(codes[r].astype(np.int64), categories=cats)
        var = pd.DataFrame(index=self.var_names().astype(str))
        return anndata.AnnData(X=X, obs=obs, var=var)

    def _check_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        r = np.asarray(rows, dtype=np.int64)
        if r.size and (r[0] < 0 or r[-1] >= self.n_obs or (np.diff(r) <= 0).any()):
            raise InputError(f"rows must be strictly increasing row numbers in [0, {self.n_obs:,})")
        return r

    def _in(self) -> str:
        return f" in {self.where}" if self.where else ""

    def __enter__(self) -> CellSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- in memory
class AnnDataSource(CellSource):
    """An ``AnnData`` (in memory or opened backed); ``layer`` chooses the matrix."""

    def __init__(self, adata: AnnData, layer: str | None = None) -> None:
        from celltune.data import io

        self.adata = adata
        self.layer = layer
        self._X = io.get_matrix(adata, layer)  # names the available layers when missing
        if adata.n_obs == 0:
            raise InputError("the AnnData has no cells; check the input")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.adata.n_obs), int(self.adata.n_vars))

    def var_names(self) -> pd.Index:
        return pd.Index(self.adata.var_names)

    def var_frame(self) -> pd.DataFrame:
        return self.adata.var

    def obs_keys(self) -> list[str]:
        return [str(c) for c in self.adata.obs.columns]

    def _obs_column(self, key: str) -> Any:
        return self.adata.obs[key].reset_index(drop=True)

    def obs_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.adata.obs_names[start:stop], dtype=object)

    def obs_frame(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        return self.adata.obs if rows is None else self.adata.obs.iloc[rows]

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        block = self._X[start:stop]
        if hasattr(block, "to_memory"):
            block = block.to_memory()
        return sp.csr_matrix(block, dtype=np.float32)


# ----------------------------------------------------------------------------- on disk
class StoreSource(CellSource):
    """An ``.h5ad`` file or a ``.zarr`` store on disk, read by row ranges with anndata's
    readers; only metadata is read up front. ``X`` (or ``layers/<layer>``) must be CSR or
    dense: a CSC matrix cannot be read by rows without loading it whole."""

    def __init__(self, path: str | os.PathLike[str], layer: str | None = None) -> None:
        self._root: Any = None
        self._matrix: Any = None
        self.path = Path(path)
        self.where = str(self.path)
        self.layer = layer
        self.format = _store_format(self.path)
        try:
            self._read_layout()
        except BaseException:
            self.close()
            raise

    def _read_layout(self) -> None:
        root = self.root
        if "obs" not in root or "var" not in root:
            raise InputError(
                f"{self.path} is a {self.format} store but not an AnnData (no obs/var groups); "
                "write it with anndata (adata.write_h5ad / adata.write_zarr)"
            )
        if self.layer is None:
            if "X" not in root:
                raise InputError(f"{self.path} has no X matrix; choose a layer (layer=...)")
            self.element = "X"
        else:
            layers = list(root["layers"].keys()) if "layers" in root else []
            if self.layer not in layers:
                raise InputError(
                    f"layer {self.layer!r} not found in {self.path}; available layers: "
                    f"{', '.join(map(repr, sorted(layers))) or '(none)'} (layer=None uses X)"
                )
            self.element = f"layers/{self.layer}"
        node = root[self.element]
        enc = _attr_str(node.attrs.get("encoding-type", ""))
        if enc == "csr_matrix":
            self.kind = "csr"
            self._shape = tuple(int(s) for s in node.attrs["shape"])
        elif enc == "csc_matrix":
            raise InputError(
                f"{self.element} of {self.path} is stored as CSC (column-major): rows cannot be "
                "read without loading the whole matrix. Rewrite it as CSR once, e.g. "
                "adata.X = adata.X.tocsr(); adata.write_h5ad(path)"
            )
        elif hasattr(node, "shape") and len(node.shape) == 2:
            self.kind = "dense"
            self._shape = tuple(int(s) for s in node.shape)
        else:
            raise InputError(
                f"{self.element} of {self.path} has an unsupported encoding {enc!r}; cells are "
                "read from CSR sparse or dense matrices"
            )
        if self._shape[0] == 0:
            raise InputError(f"{self.path} has no cells; check the input file")
        self._index_name = _attr_str(root["obs"].attrs.get("_index", "_index"))

    # -- handles (one per process) -------------------------------------------------------
    @property
    def root(self) -> Any:
        """This process's read-only root group (opened on first use)."""
        if self._root is None:
            if self.format == "zarr":
                import zarr

                self._root = zarr.open_group(str(self.path), mode="r")
            else:
                import h5py

                self._root = h5py.File(self.path, "r")
        return self._root

    @property
    def matrix(self) -> Any:
        """anndata's lazy CSR dataset (``sparse_dataset``) or the dense array node."""
        if self._matrix is None:
            from anndata.io import sparse_dataset

            node = self.root[self.element]
            self._matrix = sparse_dataset(node) if self.kind == "csr" else node
        return self._matrix

    def close(self) -> None:
        self._matrix = None
        root, self._root = getattr(self, "_root", None), None
        if root is not None and hasattr(root, "close"):
            with contextlib.suppress(Exception):
                root.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_root": None, "_matrix": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __del__(self) -> None:
        self.close()

    # -- metadata ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self._shape  # type: ignore[return-value]

    def var_names(self) -> pd.Index:
        var = self.root["var"]
        name = _attr_str(var.attrs.get("_index", "_index"))
        return pd.Index(_strings(var[name], 0, None))

    def var_frame(self) -> pd.DataFrame:
        from anndata.io import read_elem

        return read_elem(self.root["var"])

    def obs_keys(self) -> list[str]:
        return [k for k in self.root["obs"] if k != self._index_name and not k.startswith("__")]

    def _obs_column(self, key: str) -> Any:
        from anndata.io import read_elem

        return read_elem(self.root["obs"][key])

    def obs_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return _strings(self.root["obs"][self._index_name], start, stop)

    def obs_frame(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        from anndata.io import read_elem

        obs = read_elem(self.root["obs"])
        return obs if rows is None else obs.iloc[rows]

    # -- rows ----------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        block = self.matrix[start:stop]
        if self.kind == "dense":
            return sp.csr_matrix(np.asarray(block, dtype=np.float32))
        return sp.csr_matrix(block, dtype=np.float32)


# ----------------------------------------------------------------------------- helpers
def open_source(
    data: AnnData | CellSource | str | os.PathLike[str], layer: str | None = None
) -> CellSource:
    """A source for an AnnData (:class:`AnnDataSource`), a path (:class:`StoreSource`) or
    an existing source (returned as it is)."""
    if isinstance(data, CellSource):
        return data
    if isinstance(data, (str, os.PathLike)):
        return StoreSource(data, layer)
    return AnnDataSource(data, layer)


def sample_rows(
    n_obs: int, n: int, seed: int = 0, batch_labels: np.ndarray | None = None
) -> np.ndarray:
    """Sorted, seeded row sample of ``n`` cells, stratified by batch when labels are given."""
    if n >= n_obs:
        return np.arange(n_obs, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0x5A3])
    if batch_labels is None:
        return np.sort(rng.choice(n_obs, n, replace=False))
    keep = []
    for v in np.unique(batch_labels):
        idx = np.flatnonzero(batch_labels == v)
        k = max(1, round(n * idx.size / n_obs))
        keep.append(rng.choice(idx, min(k, idx.size), replace=False))
    return np.sort(np.concatenate(keep))


def compact_codes(codes: np.ndarray) -> np.ndarray:
    """Smallest signed int dtype for label codes (memory per cell matters at 1M cells)."""
    m = int(codes.max()) if codes.size else 0
    for dt in (np.int8, np.int16, np.int32):
        if m < np.iinfo(dt).max:
            return codes.astype(dt)
    return codes.astype(np.int64)


def _spans(r: np.ndarray, chunk_rows: int) -> list[tuple[np.ndarray, int, int]]:
    """Sorted rows grouped by ``chunk_rows``-row block: (rows, first, last + 1) each."""
    out = []
    block = r // max(1, int(chunk_rows))
    for c in np.unique(block):
        sel = r[block == c]
        out.append((sel, int(sel[0]), int(sel[-1]) + 1))
    return out


def _store_format(p: Path) -> str:
    """``"zarr"`` for a zarr store (a directory), ``"h5ad"`` for an HDF5 file; else one
    clear error (missing path, not HDF5, a directory that is not a zarr store)."""
    if p.is_dir() and any((p / m).exists() for m in (".zgroup", "zarr.json", ".zattrs")):
        return "zarr"
    if p.is_dir():
        raise InputError(
            f"{p} is a directory but not a .zarr store (no .zgroup / zarr.json); give an "
            ".h5ad file or a store written by adata.write_zarr"
        )
    check_h5ad_path(p, "; or give a .zarr store (adata.write_zarr)")
    return "h5ad"


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _strings(ds: Any, start: int, stop: int | None) -> np.ndarray:
    """A slice of a string array (h5py bytes / zarr StringDType) as a str object array."""
    stop = ds.shape[0] if stop is None else stop
    if hasattr(ds, "asstr") and ds.dtype.kind in ("O", "S"):
        with contextlib.suppress(TypeError, AttributeError):
            return np.asarray(ds.asstr()[start:stop], dtype=object)
    values = np.asarray(ds[start:stop])
    if values.dtype.kind in ("U", "T") or values.dtype == object:
        return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], object)
    return np.asarray([str(v) for v in values], dtype=object)


__all__ = [
    "AnnDataSource",
    "CellSource",
    "StoreSource",
    "compact_codes",
    "open_source",
    "sample_rows",
]
