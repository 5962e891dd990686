"""The files of a pretraining run: opened on disk, split, streamed and interleaved.

Every file is a :class:`~celltune.data.source.StoreSource` read by a
:class:`~celltune.data.streaming.StreamingCellDataset` of its own (its columns map to the
shared vocabulary through its own ``gene_ids``, hence its own ``TokenCollator``), so a
mini-batch holds cells of one file and memory stays that of a few chunks per file
whatever the number of cells. :class:`InterleavedLoader` draws the files' mini-batches in
a seeded order per epoch, each file in proportion to its size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from celltune.data.source import sample_rows
from celltune.errors import InputError
from celltune.tasks.integration.checks import stratified_split
from celltune.tasks.integration.inputs import source_fingerprint
from celltune.tasks.integration.train import collators
from celltune.tasks.pretrain.genes import FileGenes

if TYPE_CHECKING:
    from celltune.data.source import StoreSource
    from celltune.tasks.pretrain.config import PretrainConfig

logger = logging.getLogger("celltune.tasks.pretrain")


class InterleavedLoader:
    """Mini-batches of several loaders in one seeded, per-epoch order (no concatenation).

    ``len`` is the sum of the loaders' lengths; ``set_epoch`` reaches each loader's
    dataset and collator (what :func:`celltune.train.loader.set_epoch` does for one).
    """

    def __init__(self, loaders: Sequence[Any], seed: int = 0, shuffle: bool = True) -> None:
        self.loaders = list(loaders)
        self.seed, self.shuffle, self.epoch = int(seed), bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on (new shuffles and masks) and redraw the file order."""
        from celltune.train.loader import set_epoch

        self.epoch = int(epoch)
        for loader in self.loaders:
            set_epoch(loader, epoch)

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self) -> Iterator[Any]:
        order = np.repeat(np.arange(len(self.loaders)), [len(x) for x in self.loaders])
        if self.shuffle:
            np.random.default_rng([self.seed, 0x9E7, self.epoch]).shuffle(order)
        iters = [iter(x) for x in self.loaders]
        for i in order:
            batch = next(iters[i], None)
            if batch is not None:
                yield batch


def open_sources(paths: Sequence[str | os.PathLike[str]], layer: str | None) -> list[StoreSource]:
    """A source per file; every missing or duplicated path is named at once."""
    from celltune.data.source import StoreSource

    if not paths:
        raise InputError("no input files: pass one or more .h5ad files (or .zarr stores)")
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise InputError(f"input file(s) not found: {', '.join(missing)}")
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        raise InputError("the same input file is given twice; pass each file once")
    return [StoreSource(p, layer) for p in paths]


def file_genes(src: StoreSource, gene_column: str | None) -> list[str]:
    """Gene names of a file's columns (``var_names`` or the var column ``gene_column``)."""
    if gene_column is None:
        return [str(g) for g in src.var_names()]
    return [str(g) for g in src.var_column(gene_column).to_numpy()]


def display_names(sources: Sequence[StoreSource]) -> list[str]:
    """Short, unique names of the files for messages (the file name, else the path)."""
    names = [s.path.name for s in sources]
    if len(set(names)) < len(names):
        names = [str(s.path) for s in sources]
    return names


class PretrainInputs:
    """Rows, split and loaders of every file of one run."""

    def __init__(self, sources: list[StoreSource], cfg: PretrainConfig) -> None:
        self.sources, self.cfg = sources, cfg
        d, seed = cfg.data, cfg.train.seed
        self.rows: list[np.ndarray] = []
        for src in sources:
            if src.n_obs < 2:
                raise InputError(f"{src.path.name} has {src.n_obs} cell(s): need at least 2")
            rows = np.arange(src.n_obs, dtype=np.int64)
            if d.max_cells is not None and d.max_cells < src.n_obs:
                rows = sample_rows(src.n_obs, d.max_cells, seed)
            self.rows.append(rows)
        file_of = np.concatenate([np.full(r.size, i) for i, r in enumerate(self.rows)])
        train, val = stratified_split(file_of, d.valid_fraction, seed)
        offsets = np.cumsum([0] + [r.size for r in self.rows])
        self.split = [
            (rows[train[(train >= a) & (train < b)] - a], rows[val[(val >= a) & (val < b)] - a])
            for rows, a, b in zip(self.rows, offsets[:-1], offsets[1:], strict=True)
        ]
        for src, (tr, va) in zip(sources, self.split, strict=True):
            logger.info(
                "%s: %s cells (%s training, %s validation)",
                src.path.name,
                f"{tr.size + va.size:,}",
                f"{tr.size:,}",
                f"{va.size:,}",
            )

    @property
    def n_cells(self) -> int:
        """Cells of the run, all files together."""
        return int(sum(r.size for r in self.rows))

    def _dataset(self, i: int, fg: FileGenes, rows: np.ndarray, **kw: Any) -> Any:
        from celltune.data.streaming import StreamingCellDataset

        d = self.cfg.data
        cols = np.flatnonzero(fg.gene_ids >= 0)
        return StreamingCellDataset(
            self.sources[i],
            fg.gene_ids[cols],
            rows=rows,
            var_subset=cols,
            chunk_size=d.chunk_size,
            buffer_chunks=d.buffer_chunks,
            n_bins=d.n_bins,
            seed=self.cfg.train.seed,
            group_by_batch=False,
            **kw,
        )

    def loaders(self, vocab: Any, files: list[FileGenes]) -> tuple[Any, Any]:
        """Training and validation loaders: one streamed dataset per file, interleaved."""
        from celltune.train import distributed as dist_utils

        tc = self.cfg.train
        device = tc.resolve_device(dist_utils.local_rank())
        kw = {"num_workers": tc.num_workers, "pin_memory": tc.resolve_pin_memory(device)}
        eval_kw = {"batch_size": tc.eval_batch_size or tc.batch_size, "shuffle": False}
        train, val = [], []
        for i, fg in enumerate(files):
            gene_ids = fg.gene_ids[fg.gene_ids >= 0]
            train_coll, val_coll, _ = collators(self.cfg, vocab, gene_ids)
            tr_rows, va_rows = self.split[i]
            tr = self._dataset(i, fg, tr_rows, batch_size=tc.batch_size, shuffle=True)
            train.append(tr.loader(train_coll, **kw))
            if va_rows.size:  # every rank scores all validation cells
                va = self._dataset(i, fg, va_rows, num_replicas=1, rank=0, **eval_kw)
                val.append(va.loader(val_coll, **kw))
        seed = self.cfg.train.seed
        return InterleavedLoader(train, seed), InterleavedLoader(val, seed, shuffle=False)

    def fingerprint(self, vocab: Any) -> dict[str, Any]:
        """Every file's fingerprint: a resume on other files (or another order) is refused."""
        fps = [source_fingerprint(s, vocab if i == 0 else None) for i, s in enumerate(self.sources)]
        return {"files": fps, "vocab": fps[0].pop("vocab")}


__all__ = ["InterleavedLoader", "PretrainInputs", "display_names", "file_genes", "open_sources"]
