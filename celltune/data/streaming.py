"""Train and embed from a file on disk (``.h5ad``/``.zarr``): bounded memory at any size.

The in-memory path (:class:`~celltune.data.dataset.CellDataset`) holds the whole binned
matrix; scGPT's reference holds a dense copy plus dense token tensors, so its memory grows
with cells × genes (issue 7). Here only per-cell metadata that planning needs is held
(the batch label codes, and one small code array per label column); expression rows are
read from the file a window of chunks at a time, binned and handed to the usual
:class:`~celltune.data.dataset.TokenCollator`. Peak memory is set by ``chunk_size ×
buffer_chunks`` rows, not by the dataset.

Rows come from a :class:`~celltune.data.source.CellSource` (``.h5ad``/``.zarr`` on disk
through anndata's readers, or an AnnData). The epoch plan (contiguous chunks, batch-aware
shuffle windows, DDP rank and worker shards, even batches) is
:func:`celltune.data.windows.plan_epoch`; DataLoader worker ``w`` of ``W`` takes its
rank's windows ``w, w + W, ...`` and opens its own file handle.

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
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from celltune.data.binning import bin_matrix, cell_keys
from celltune.data.replicate import replicate_h5ad
from celltune.data.source import CellSource, StoreSource, open_source, sample_rows
from celltune.data.windows import (
    Window,
    dist_rank,
    dist_world_size,
    effective_chunk_size,
    plan_epoch,
)
from celltune.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: The on-disk source under its former name (it read ``.h5ad`` files only).
H5adSource = StoreSource


# ----------------------------------------------------------------------------- dataset
class StreamingCellDataset(IterableDataset):
    """Mini-batches of cells read from a :class:`~celltune.data.source.CellSource` (an
    on-disk ``.h5ad``/``.zarr`` path, or an AnnData); items as ``CellDataset``'s.

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
        source: CellSource | AnnData | str | os.PathLike[str],
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
        self.source = open_source(source, layer)
        n_obs, n_vars = self.source.shape
        self.var_subset = _check_var_subset(var_subset, n_vars)
        n_genes = n_vars if self.var_subset is None else self.var_subset.size
        self.gene_ids = np.asarray(gene_ids, dtype=np.int64)
        if self.gene_ids.shape != (n_genes,):
            raise InputError(
                f"gene_ids has {self.gene_ids.size:,} entries but {n_genes:,} genes are "
                "streamed; pass one vocab id per column of var_subset (GeneVocab.match_genes)"
            )
        if not (self.gene_ids >= 0).any():
            raise InputError("no streamed gene is in the vocabulary (all gene_ids are -1)")
        self.rows = _check_rows(rows, n_obs)
        n = n_obs if self.rows is None else self.rows.size
        self.n_rows = int(n)

        labels, self.batch_categories = self._codes(
            batch_key, batch_categories, "batch labels (batch_key)"
        )
        self.batch_labels: np.ndarray = np.zeros(n, dtype=np.int8) if labels is None else labels
        self.celltype_labels, self.label_categories = self._codes(
            label_key, label_categories, "cell-type labels (label_key)"
        )
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
        self._num_replicas = dist_world_size() if num_replicas is None else int(num_replicas)
        self._rank = dist_rank() if rank is None else int(rank)
        self.epoch = 0
        self._len_cache: tuple[tuple[int, int, int], int] | None = None
        self.source.close()  # opened again lazily, in whichever process iterates

    def _codes(
        self, key: str | None, categories: Sequence[Any] | None, purpose: str
    ) -> tuple[np.ndarray | None, list[Any]]:
        """Codes of an obs column for this dataset's rows (None, [] without a key)."""
        if key is None:
            return None, []
        codes, cats = self.source.obs_codes(key, categories, purpose)
        return (codes if self.rows is None else codes[self.rows]), cats

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
def _check_var_subset(var_subset: Any, n_vars: int) -> np.ndarray | None:
    """Column indices (or one flag per column) as int64 indices in the given order;
    ``None`` for all columns in order."""
    if var_subset is None:
        return None
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
    return None if np.array_equal(vs, np.arange(n_vars)) else vs


def _check_rows(rows: Any, n_obs: int) -> np.ndarray | None:
    """Strictly increasing row numbers of the source (``None``: all rows)."""
    if rows is None:
        return None
    r = np.asarray(rows, dtype=np.int64)
    if r.size == 0:
        raise InputError("rows is empty: select at least one cell")
    if r.min() < 0 or r.max() >= n_obs or (r.size > 1 and (np.diff(r) <= 0).any()):
        raise InputError(
            f"rows must be strictly increasing row numbers in [0, {n_obs:,}); "
            "sort them (np.unique) first"
        )
    return r


def read_cells(
    path: str | os.PathLike[str] | CellSource,
    rows: Sequence[int] | np.ndarray,
    *,
    layer: str | None = None,
    obs_keys: Sequence[str] = (),
    chunk_size: int = 4096,
) -> AnnData:
    """An in-memory AnnData of some rows of a large file (e.g. a sample for HVG selection).

    Only the requested rows and obs columns are read, chunk by chunk
    (:meth:`celltune.data.source.CellSource.to_anndata`).
    """
    src = open_source(path, layer)
    try:
        return src.to_anndata(rows, obs_keys, chunk_rows=chunk_size)
    finally:
        src.close()


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
