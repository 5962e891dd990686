"""Train and embed straight from an on-disk ``.h5ad``: bounded memory at any number of cells.

The in-memory path (:class:`~celltune.data.dataset.CellDataset`) holds the whole binned
matrix; scGPT's reference holds a dense copy plus dense token tensors, so its memory grows
with cells × genes (issue 7). Here only per-cell metadata that planning needs is held
(the batch label codes, and one small code array per label column); expression rows are
read from the file a window of chunks at a time, binned and handed to the usual
:class:`~celltune.data.dataset.TokenCollator`. Peak memory is set by ``chunk_size ×
buffer_chunks`` rows, not by the dataset.

An epoch, for every process alike (all draws come from ``seed`` and the epoch only):

1. the rows are cut into contiguous chunks of ``chunk_size`` rows (contiguous on disk, so
   one read per chunk); the chunk order is shuffled;
2. rank ``r`` of ``R`` (DDP) takes chunks ``r, r + R, ...``: ranks never overlap;
3. a rank's chunks are grouped ``buffer_chunks`` at a time into windows; inside a window
   the rows are shuffled, grouped by batch label (so every mini-batch holds one batch, as
   DSBN needs) and cut into mini-batches, whose order is shuffled (a bounded shuffle
   buffer of ``chunk_size × buffer_chunks`` rows);
4. DataLoader worker ``w`` of ``W`` takes its rank's windows ``w, w + W, ...`` and opens its
   own HDF5 handle;
5. with ``even_batches`` (the default under DDP) ranks with fewer mini-batches repeat their
   first ones so every rank steps the same number of times (as ``DistributedSampler``).

Binning uses :func:`celltune.data.binning.bin_matrix` on each window with the cells'
stable keys, so a cell bins identically to the in-memory path whatever window, worker or
rank it lands in; tokenisation (masks, sub-sampling) is keyed on the cell as well.
Binning is per cell and invariant to library size and monotone transforms, so raw counts
on disk bin the same as their normalised + log1p values would.

Typical use::

    ds = StreamingCellDataset("big.h5ad", gene_ids, batch_key="batch", batch_size=64,
                              var_subset=hvg_columns)
    coll = TokenCollator(n_genes=ds.n_genes, gene_ids=gene_ids, cls_id=..., pad_id=...)
    loader = ds.loader(coll, num_workers=2)      # mini-batches are already formed
    trainer.fit(loader)                          # Trainer calls set_epoch on both
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from celltune.data.binning import bin_matrix, cell_keys
from celltune.data.io import check_h5ad_path
from celltune.errors import InputError

if TYPE_CHECKING:
    import h5py
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: Mixed into every planning RNG so streaming draws never collide with other consumers of
#: ``default_rng([seed, epoch, ...])`` (masks use ``[seed, epoch, cell_key]``).
_PLAN_TAG = 0x57AE


# ----------------------------------------------------------------------------- the file
class H5adSource:
    """Read-only access to one matrix of an ``.h5ad`` file by row ranges, via h5py.

    Only metadata is read up front (shape, encoding); rows are read on demand. The h5py
    handle is opened lazily and never pickled, so each DataLoader worker (a separate
    process) opens its own — HDF5 handles must not be shared across ``fork``.
    """

    def __init__(self, path: str | os.PathLike[str], layer: str | None = None) -> None:
        self._file: h5py.File | None = None
        self.path = Path(path)
        self.layer = layer
        check_h5ad_path(self.path, "; streaming needs an .h5ad on disk")
        try:
            self._read_layout(layer)
        except BaseException:
            self.close()
            raise

    def _read_layout(self, layer: str | None) -> None:
        f = self.file
        if "obs" not in f or "var" not in f:
            raise InputError(
                f"{self.path} is an HDF5 file but not an AnnData .h5ad (no obs/var groups); "
                "write it with anndata (adata.write_h5ad)"
            )
        if layer is None:
            if "X" not in f:
                raise InputError(f"{self.path} has no X matrix; choose a layer (layer=...)")
            node = f["X"]
            where = "X"
        else:
            layers = list(f["layers"].keys()) if "layers" in f else []
            if layer not in layers:
                raise InputError(
                    f"layer {layer!r} not found in {self.path}; available layers: "
                    f"{', '.join(map(repr, layers)) or '(none)'} (layer=None uses X)"
                )
            node = f["layers"][layer]
            where = f"layers/{layer}"
        self.where = where
        enc = _attr_str(node.attrs.get("encoding-type", ""))
        if enc == "csr_matrix":
            self.kind = "csr"
            self.shape = tuple(int(s) for s in node.attrs["shape"])
        elif enc == "csc_matrix":
            raise InputError(
                f"{where} of {self.path} is stored as CSC (column-major): rows cannot be read "
                "without loading the whole matrix. Rewrite it as CSR once, e.g. "
                "adata.X = adata.X.tocsr(); adata.write_h5ad(path)"
            )
        elif hasattr(node, "shape") and len(node.shape) == 2:
            self.kind = "dense"
            self.shape = tuple(int(s) for s in node.shape)
        else:
            raise InputError(
                f"{where} of {self.path} has an unsupported encoding {enc!r}; streaming reads "
                "CSR sparse or dense matrices"
            )
        if self.shape[0] == 0:
            raise InputError(f"{self.path} has no cells; check the input file")
        self._index_name = _attr_str(f["obs"].attrs.get("_index", "_index"))

    # -- handle management (worker safety) ---------------------------------------------
    @property
    def file(self) -> h5py.File:
        """This process's handle (opened on first use, read-only)."""
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        return self._file

    def close(self) -> None:
        """Close this process's handle (reopened on the next read)."""
        if getattr(self, "_file", None) is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # every process opens its own handle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __del__(self) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]

    def var_names(self) -> pd.Index:
        """Gene names (small: read whole)."""
        var = self.file["var"]
        name = _attr_str(var.attrs.get("_index", "_index"))
        return pd.Index(_read_strings(var[name], 0, var[name].shape[0]))

    def var_column(self, key: str) -> pd.Series:
        """A ``var`` column (e.g. gene symbols when ``var_names`` are Ensembl ids)."""
        from anndata.io import read_elem

        var = self.file["var"]
        if key not in var:
            cols = [c for c in var if c != _attr_str(var.attrs.get("_index", "_index"))]
            raise InputError(
                f"var column {key!r} not found in {self.path}; available: "
                f"{', '.join(map(repr, cols)) or '(none)'}"
            )
        return pd.Series(read_elem(var[key]))

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        """Cell names of rows ``start:stop`` (read from disk, never held for all cells)."""
        return _read_strings(self.file["obs"][self._index_name], start, stop)

    def obs_keys(self) -> list[str]:
        obs = self.file["obs"]
        return [k for k in obs if k != self._index_name]

    def obs_codes(
        self, key: str, categories: Sequence[Any] | None, purpose: str
    ) -> tuple[np.ndarray, list[Any]]:
        """Integer codes of an obs column (compact dtype) and their category order.

        Same convention as ``CellDataset``: the given ``categories``; else a categorical
        column's own categories; else the sorted unique values.
        """
        obs = self.file["obs"]
        if key not in obs:
            raise InputError(
                f"obs column {key!r} (needed for {purpose}) not found in {self.path}; "
                f"available obs columns: {', '.join(map(repr, self.obs_keys())) or '(none)'}"
            )
        node = obs[key]
        if _attr_str(node.attrs.get("encoding-type", "")) == "categorical":
            codes = np.asarray(node["codes"][:])
            own = list(_read_strings(node["categories"], 0, node["categories"].shape[0]))
            if (codes < 0).any():
                raise InputError(
                    f"obs column {key!r} (needed for {purpose}) has "
                    f"{int((codes < 0).sum()):,} missing values; fill or drop those cells"
                )
            if categories is None:
                return codes, own
            cats = list(categories)
            lookup = {str(c): i for i, c in enumerate(cats)}
            remap = np.array([lookup.get(str(c), -1) for c in own], dtype=np.int64)
            if (remap[np.unique(codes)] < 0).any():
                unknown = sorted({own[c] for c in np.unique(codes) if remap[c] < 0})[:10]
                raise InputError(
                    f"obs column {key!r} has values not in the given categories: {unknown}; "
                    "pass categories that include them or drop those cells"
                )
            return _compact(remap[codes]), cats
        from anndata.io import read_elem

        col = pd.Series(np.asarray(read_elem(node)))
        if col.isna().any():
            raise InputError(
                f"obs column {key!r} (needed for {purpose}) has {int(col.isna().sum()):,} "
                "missing values; fill or drop those cells"
            )
        if categories is None:
            cat = col.astype(str).astype("category")
            return _compact(np.asarray(cat.cat.codes)), list(cat.cat.categories)
        cats = list(categories)
        codes = pd.Categorical(col.astype(str), categories=[str(c) for c in cats]).codes
        if (codes < 0).any():
            unknown = sorted({str(v) for v in col[codes < 0]})[:10]
            raise InputError(
                f"obs column {key!r} has values not in the given categories: {unknown}; "
                "pass categories that include them or drop those cells"
            )
        return _compact(np.asarray(codes)), cats

    # -- rows --------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR float32 (one contiguous read; dense rows sparsified)."""
        node = self.file[self.where]
        n = stop - start
        if self.kind == "dense":
            block = np.asarray(node[start:stop], dtype=np.float32)
            return sp.csr_matrix(block)
        ip = np.asarray(node["indptr"][start : stop + 1], dtype=np.int64)
        a, b = int(ip[0]), int(ip[-1])
        data = np.asarray(node["data"][a:b], dtype=np.float32)
        indices = np.asarray(node["indices"][a:b], dtype=np.int32)
        return sp.csr_matrix((data, indices, ip - a), shape=(n, self.n_vars))


# ----------------------------------------------------------------------------- planning
@dataclass
class Window:
    """One shuffle buffer: the mini-batches (positions into the dataset's rows) it yields."""

    window_id: int
    batches: list[np.ndarray]
    padding: bool = False


def plan_epoch(
    batch_labels: np.ndarray | None,
    n_rows: int,
    *,
    batch_size: int,
    chunk_size: int,
    buffer_chunks: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    num_replicas: int = 1,
    rank: int = 0,
    drop_last: bool = False,
    even_batches: bool = True,
) -> list[Window]:
    """The windows (and their mini-batches) of one rank for one epoch; metadata only.

    Pure index arithmetic on the batch labels, so every rank and worker computes the same
    global plan without reading expression data. ``batch_labels=None`` forms mini-batches
    without regard to batch (embedding). See the module docstring for the scheme.
    """
    per_rank = [
        _rank_windows(
            batch_labels,
            n_rows,
            batch_size,
            chunk_size,
            buffer_chunks,
            shuffle,
            seed,
            epoch,
            num_replicas,
            r,
            drop_last,
        )
        for r in (range(num_replicas) if even_batches and num_replicas > 1 else [rank])
    ]
    mine = per_rank[rank] if len(per_rank) > 1 else per_rank[0]
    if not (even_batches and num_replicas > 1):
        return mine
    counts = [sum(len(w.batches) for w in ws) for ws in per_rank]
    n_mine = counts[rank]
    if drop_last:  # everyone stops at the smallest share
        target = min(counts)
        out: list[Window] = []
        left = target
        for w in mine:
            if left <= 0:
                break
            out.append(Window(w.window_id, w.batches[:left], w.padding))
            left -= len(out[-1].batches)
        return out
    target = max(counts)
    if target > n_mine:
        if n_mine == 0:
            raise InputError(
                f"rank {rank} received no cells: {n_rows:,} rows are too few for "
                f"{num_replicas} processes; use fewer processes"
            )
        flat = [b for w in mine for b in w.batches]
        reps = math.ceil((target - n_mine) / len(flat))
        pad = (flat * reps)[: target - n_mine]
        mine = [*mine, Window(-1, pad, padding=True)]
    return mine


def _rank_windows(
    labels: np.ndarray | None,
    n: int,
    batch_size: int,
    chunk_size: int,
    buffer_chunks: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    num_replicas: int,
    rank: int,
    drop_last: bool,
) -> list[Window]:
    cs = effective_chunk_size(n, chunk_size, num_replicas)
    n_chunks = math.ceil(n / cs)
    rng = np.random.default_rng([seed, epoch, _PLAN_TAG])
    order = rng.permutation(n_chunks) if shuffle else np.arange(n_chunks)
    mine = order[rank::num_replicas]
    windows: list[Window] = []
    for w, start in enumerate(range(0, mine.size, buffer_chunks)):
        chunks = mine[start : start + buffer_chunks]
        pos = np.concatenate([np.arange(c * cs, min((c + 1) * cs, n)) for c in chunks])
        wrng = np.random.default_rng([seed, epoch, _PLAN_TAG, num_replicas, rank, w])
        if labels is None:
            groups = [pos]
        else:
            lab = labels[pos]
            groups = [pos[lab == v] for v in np.unique(lab)]
        batches: list[np.ndarray] = []
        for g in groups:
            idx = wrng.permutation(g) if shuffle else g
            for b0 in range(0, idx.size, batch_size):
                mb = idx[b0 : b0 + batch_size]
                if drop_last and mb.size < batch_size:
                    break
                batches.append(mb)
        if shuffle and batches:
            batches = [batches[i] for i in wrng.permutation(len(batches))]
        windows.append(Window(int(w), batches))
    return windows


def effective_chunk_size(n_rows: int, chunk_size: int, num_replicas: int = 1) -> int:
    """``chunk_size``, lowered when needed so that every rank gets at least one chunk."""
    return max(1, min(int(chunk_size), math.ceil(n_rows / max(1, num_replicas))))


# ----------------------------------------------------------------------------- dataset
class StreamingCellDataset(IterableDataset):
    """Mini-batches of cells read from an on-disk ``.h5ad``; items as ``CellDataset``'s.

    Yields *lists* of item dicts (``index`` = the cell's row in the file, ``key``,
    ``indices``/``data`` = its binned non-zero row over ``var_subset``, ``batch_label``,
    ``celltype_label``), one list per mini-batch; pair it with a ``TokenCollator`` through
    :meth:`loader` (``DataLoader(batch_size=None)``), so tokenising runs in the workers.

    ``gene_ids``: vocab id per column of ``var_subset`` (-1 = dropped after binning, as in
    ``CellDataset``). ``var_subset``: the file's columns that form the matrix to bin (e.g.
    the HVGs), in order; default all. ``rows``: the file rows to use (e.g. the training
    split); default all. ``n_bins=None`` streams an already binned layer as it is.
    ``num_replicas``/``rank`` default to the torch.distributed group, else to torchrun's
    ``WORLD_SIZE``/``RANK``, read when the dataset is built.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        gene_ids: Sequence[int] | np.ndarray,
        *,
        layer: str | None = None,
        var_subset: Sequence[int] | np.ndarray | None = None,
        rows: Sequence[int] | np.ndarray | None = None,
        batch_key: str | None = None,
        label_key: str | None = None,
        batch_categories: Sequence[Any] | None = None,
        label_categories: Sequence[Any] | None = None,
        batch_size: int = 64,
        chunk_size: int = 1024,
        buffer_chunks: int = 8,
        shuffle: bool = True,
        group_by_batch: bool | None = None,
        drop_last: bool = False,
        n_bins: int | None = 51,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        even_batches: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("chunk_size", chunk_size),
            ("buffer_chunks", buffer_chunks),
        ):
            if int(value) < 1:
                raise InputError(f"{name} must be >= 1 (got {value})")
        if n_bins is not None and n_bins < 2:
            raise InputError(f"n_bins must be >= 2 or None (pre-binned layer), got {n_bins}")
        self.source = H5adSource(path, layer)
        n_obs, n_vars = self.source.shape
        if var_subset is None:
            self.var_subset: np.ndarray | None = None
            n_genes = n_vars
        else:
            vs = np.asarray(var_subset)
            if vs.dtype == bool:
                if vs.shape != (n_vars,):
                    raise InputError(
                        f"boolean var_subset has {vs.size:,} entries, the file has {n_vars:,} "
                        "genes; pass one flag per gene (or column indices)"
                    )
                vs = np.flatnonzero(vs)
            vs = vs.astype(np.int64)
            if vs.size == 0 or vs.min() < 0 or vs.max() >= n_vars:
                raise InputError(
                    f"var_subset must hold column indices in [0, {n_vars}) (got {vs.size:,} "
                    "entries); select at least one gene of the file"
                )
            self.var_subset = None if np.array_equal(vs, np.arange(n_vars)) else vs
            n_genes = vs.size
        self.gene_ids = np.asarray(gene_ids, dtype=np.int64)
        if self.gene_ids.shape != (n_genes,):
            raise InputError(
                f"gene_ids has {self.gene_ids.size:,} entries but {n_genes:,} genes are "
                "streamed; pass one vocab id per column of var_subset (GeneVocab.match_genes)"
            )
        if not (self.gene_ids >= 0).any():
            raise InputError("no streamed gene is in the vocabulary (all gene_ids are -1)")
        if rows is None:
            self.rows: np.ndarray | None = None
            n = n_obs
        else:
            r = np.asarray(rows, dtype=np.int64)
            if r.size == 0:
                raise InputError("rows is empty: select at least one cell")
            if r.min() < 0 or r.max() >= n_obs or (r.size > 1 and (np.diff(r) <= 0).any()):
                raise InputError(
                    f"rows must be strictly increasing row numbers in [0, {n_obs:,}); "
                    "sort them (np.unique) first"
                )
            self.rows = r
            n = r.size
        self.n_rows = int(n)

        if batch_key is not None:
            codes, self.batch_categories = self.source.obs_codes(
                batch_key, batch_categories, "batch labels (batch_key)"
            )
            self.batch_labels: np.ndarray = codes if self.rows is None else codes[self.rows]
        else:
            self.batch_labels = np.zeros(n, dtype=np.int8)
            self.batch_categories = []
        if label_key is not None:
            codes, self.label_categories = self.source.obs_codes(
                label_key, label_categories, "cell-type labels (label_key)"
            )
            self.celltype_labels: np.ndarray | None = (
                codes if self.rows is None else codes[self.rows]
            )
        else:
            self.celltype_labels = None
            self.label_categories = []
        self.batch_key = batch_key
        self.batch_size = int(batch_size)
        self.chunk_size = int(chunk_size)
        self.buffer_chunks = int(buffer_chunks)
        self.shuffle = bool(shuffle)
        self.group_by_batch = (batch_key is not None) if group_by_batch is None else group_by_batch
        self.drop_last = bool(drop_last)
        self.n_bins = n_bins
        self.seed = int(seed)
        self.even_batches = bool(even_batches)
        # Fixed now, in the launching process: workers are separate processes where the
        # process group does not exist (the environment variables of torchrun do).
        self._num_replicas = _dist_world_size() if num_replicas is None else int(num_replicas)
        self._rank = _dist_rank() if rank is None else int(rank)
        self.epoch = 0
        self._len_cache: tuple[tuple[int, int, int], int] | None = None
        self.source.close()  # opened again lazily, in whichever process iterates

    # -- properties --------------------------------------------------------------------
    @property
    def n_genes(self) -> int:
        """Columns per cell after ``var_subset`` (the collator's ``n_genes``)."""
        return int(self.gene_ids.size)

    @property
    def num_replicas(self) -> int:
        """DDP world size this dataset shards for (given, or from the launcher)."""
        return self._num_replicas

    @property
    def rank(self) -> int:
        """This process's rank among ``num_replicas``."""
        return self._rank

    def set_epoch(self, epoch: int) -> None:
        """New shuffle for a new epoch (every rank must pass the same value)."""
        self.epoch = int(epoch)

    def plan(self, epoch: int | None = None) -> list[Window]:
        """This rank's windows for ``epoch`` (default: the current one)."""
        R, r = self.num_replicas, self.rank
        if not 0 <= r < R:
            raise InputError(f"need 0 <= rank < num_replicas (got rank={r}, {R})")
        return plan_epoch(
            self.batch_labels if self.group_by_batch else None,
            self.n_rows,
            batch_size=self.batch_size,
            chunk_size=self.chunk_size,
            buffer_chunks=self.buffer_chunks,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch if epoch is None else int(epoch),
            num_replicas=R,
            rank=r,
            drop_last=self.drop_last,
            even_batches=self.even_batches,
        )

    def __len__(self) -> int:
        """Mini-batches this rank yields in the current epoch (all workers together)."""
        key = (self.epoch, self.num_replicas, self.rank)
        if self._len_cache is None or self._len_cache[0] != key:
            self._len_cache = (key, sum(len(w.batches) for w in self.plan()))
        return self._len_cache[1]

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        windows = self.plan()
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            windows = windows[info.id :: info.num_workers]
        try:
            for window in windows:
                yield from self._window_items(window)
        finally:
            self.source.close()

    def _window_items(self, window: Window) -> Iterator[list[dict[str, Any]]]:
        if not window.batches:
            return
        pos = np.unique(np.concatenate(window.batches))
        block, keys = self.read_positions(pos)
        local = {int(p): i for i, p in enumerate(pos)}
        file_rows = pos if self.rows is None else self.rows[pos]
        indptr, indices, data = block.indptr, block.indices, block.data
        for mb in window.batches:
            items = []
            for p in mb:
                i = local[int(p)]
                a, b = indptr[i], indptr[i + 1]
                items.append(
                    {
                        "index": int(file_rows[i]),
                        "key": int(keys[i]),
                        "indices": indices[a:b],
                        "data": data[a:b],
                        "batch_label": int(self.batch_labels[p]),
                        "celltype_label": -1
                        if self.celltype_labels is None
                        else int(self.celltype_labels[p]),
                    }
                )
            yield items

    def read_positions(self, pos: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """Binned rows (over ``var_subset``) and cell keys for sorted dataset positions.

        Reads whole chunks (contiguous on disk) and keeps the rows asked for; memory is
        that of the chunks touched, never the whole matrix.
        """
        pos = np.asarray(pos, dtype=np.int64)
        file_rows = pos if self.rows is None else self.rows[pos]
        cs = effective_chunk_size(self.n_rows, self.chunk_size, self.num_replicas)
        parts: list[sp.csr_matrix] = []
        names: list[np.ndarray] = []
        chunk_of = pos // cs
        for c in np.unique(chunk_of):
            sel = file_rows[chunk_of == c]
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            rows = self.source.read_rows(lo, hi)
            if sel.size != hi - lo:
                rows = rows[sel - lo]
            if self.var_subset is not None:
                rows = rows[:, self.var_subset]
            parts.append(rows)
            all_names = self.source.obs_names(lo, hi)
            names.append(all_names[sel - lo])
        block = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        block = sp.csr_matrix(block, dtype=np.float32)
        keys = cell_keys(np.concatenate(names))
        if self.n_bins is not None:
            with _quiet_binning():
                block = bin_matrix(block, self.n_bins, self.seed, keys, quiet=True)
        elif not block.has_canonical_format:
            block.sum_duplicates()
        return block, keys

    def loader(
        self,
        collate_fn: Any = None,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> DataLoader:
        """A DataLoader over the ready-made mini-batches (``batch_size=None``).

        Workers are not persistent, so ``set_epoch`` reaches them each epoch; each opens
        its own file handle. ``collate_fn`` (a ``TokenCollator``) runs in the workers.
        """
        kwargs: dict[str, Any] = {}
        if num_workers > 0 and prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        return DataLoader(
            self,
            batch_size=None,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            **kwargs,
        )


# ----------------------------------------------------------------------------- helpers
def read_cells(
    path: str | os.PathLike[str],
    rows: Sequence[int] | np.ndarray,
    *,
    layer: str | None = None,
    obs_keys: Sequence[str] = (),
    chunk_size: int = 4096,
) -> AnnData:
    """An in-memory AnnData of some rows of a large file (e.g. a sample for HVG selection).

    Only the requested rows and obs columns are read, chunk by chunk.
    """
    import anndata

    src = H5adSource(path, layer)
    r = np.unique(np.asarray(rows, dtype=np.int64))
    if r.size == 0 or r[0] < 0 or r[-1] >= src.n_obs:
        raise InputError(f"rows must be non-empty row numbers in [0, {src.n_obs:,})")
    parts, names = [], []
    for c in np.unique(r // chunk_size):
        sel = r[(r // chunk_size) == c]
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        parts.append(src.read_rows(lo, hi)[sel - lo])
        names.append(src.obs_names(lo, hi)[sel - lo])
    X = sp.vstack(parts, format="csr").astype(np.float32)
    obs = pd.DataFrame(index=pd.Index(np.concatenate(names).astype(str)))
    for key in obs_keys:
        codes, cats = src.obs_codes(key, None, f"obs column {key!r}")
        obs[key] = pd.Categorical.from_codes(codes[r].astype(np.int64), categories=cats)
    var = pd.DataFrame(index=src.var_names().astype(str))
    src.close()
    return anndata.AnnData(X=X, obs=obs, var=var)


def replicate_h5ad(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    factor: int,
    *,
    layer: str | None = None,
    chunk_rows: int = 16384,
    compression: str | None = None,
) -> Path:
    """Write ``src`` repeated ``factor`` times as a CSR ``.h5ad`` (obs, var and X only).

    For scale tests and benchmarks: the output (e.g. 1.2M cells) is written chunk by chunk
    through h5py, so memory is that of the source's rows and the output's ``obs``, never
    the output matrix. Cell names get a ``-<replicate>`` suffix so they stay unique (and
    replicated cells get their own binning draws). Written atomically.
    """
    import anndata
    import h5py
    from anndata.io import read_elem

    from celltune.files import atomic_path

    if factor < 1:
        raise InputError(f"factor must be >= 1 (got {factor})")
    source = H5adSource(src, layer)
    f = source.file
    obs = read_elem(f["obs"])
    var = read_elem(f["var"])
    n, g = source.shape
    names = obs.index.astype(str).to_numpy()
    rep_obs = pd.concat([obs] * factor, ignore_index=True)
    rep_obs.index = pd.Index(
        np.concatenate([names + (f"-{k}" if factor > 1 else "") for k in range(factor)])
    )
    if source.kind == "csr":
        src_ip = np.asarray(f[source.where]["indptr"][:], dtype=np.int64)
    else:  # dense: count non-zeros chunk by chunk
        counts = np.concatenate(
            [
                np.diff(source.read_rows(a, min(a + chunk_rows, n)).indptr)
                for a in range(0, n, chunk_rows)
            ]
        )
        src_ip = np.concatenate([[0], np.cumsum(counts)])
    nnz = int(src_ip[-1])
    with atomic_path(dst) as tmp:
        anndata.AnnData(obs=rep_obs, var=var).write_h5ad(tmp)
        del rep_obs
        with h5py.File(tmp, "a") as out:
            if "X" in out:
                del out["X"]
            grp = out.create_group("X")
            grp.attrs["encoding-type"] = "csr_matrix"
            grp.attrs["encoding-version"] = "0.1.0"
            grp.attrs["shape"] = np.array([n * factor, g], dtype=np.int64)
            opts: dict[str, Any] = {"compression": compression} if compression else {}
            chunk = (min(max(nnz * factor, 1), 1 << 20),)
            data = grp.create_dataset(
                "data", (nnz * factor,), dtype=np.float32, chunks=chunk, **opts
            )
            indices = grp.create_dataset(
                "indices", (nnz * factor,), dtype=np.int32, chunks=chunk, **opts
            )
            indptr = grp.create_dataset("indptr", (n * factor + 1,), dtype=np.int64)
            indptr[0] = 0
            for a in range(0, n, chunk_rows):
                b = min(a + chunk_rows, n)
                rows = source.read_rows(a, b)
                for k in range(factor):
                    off = k * nnz
                    data[off + src_ip[a] : off + src_ip[b]] = rows.data
                    indices[off + src_ip[a] : off + src_ip[b]] = rows.indices
                    indptr[k * n + a + 1 : k * n + b + 1] = src_ip[a + 1 : b + 1] + off
    source.close()
    return Path(dst)


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


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_strings(ds: Any, start: int, stop: int) -> np.ndarray:
    if ds.dtype.kind in ("O", "S", "U"):
        with contextlib.suppress(TypeError, AttributeError):
            return np.asarray(ds.asstr()[start:stop], dtype=object)
    return np.asarray([str(v) for v in ds[start:stop]], dtype=object)


def _compact(codes: np.ndarray) -> np.ndarray:
    """Smallest signed int dtype for label codes (memory per cell matters at 1M cells)."""
    m = int(codes.max()) if codes.size else 0
    for dt in (np.int8, np.int16, np.int32):
        if m < np.iinfo(dt).max:
            return codes.astype(dt)
    return codes.astype(np.int64)


@contextlib.contextmanager
def _quiet_binning() -> Iterator[None]:
    """Silence bin_matrix's per-call all-zero-cells warning: per window it would repeat
    thousands of times on a large file (the cells still bin to zeros, as documented)."""
    blog = logging.getLogger("celltune.data.binning")

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "no non-zero value" not in record.getMessage()

    filt = _Drop()
    blog.addFilter(filt)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*all zero and stay all zero.*")
            yield
    finally:
        blog.removeFilter(filt)


def _dist_world_size() -> int:
    """The process group's size, else torchrun's ``WORLD_SIZE``: DataLoader workers and
    datasets built before ``init_process_group`` must still shard like their rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "RANK" in os.environ:
        return int(os.environ.get("WORLD_SIZE", "1"))
    return 1


def _dist_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return 0


__all__ = [
    "H5adSource",
    "StreamingCellDataset",
    "Window",
    "effective_chunk_size",
    "plan_epoch",
    "read_cells",
    "replicate_h5ad",
    "sample_rows",
]
