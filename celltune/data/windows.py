"""Epoch planning for streamed data: contiguous chunks, batch-aware windows, DDP shards.

Pure index arithmetic on per-cell batch codes (no expression data is read), so every
rank and DataLoader worker computes the same global plan from ``seed`` and the epoch:

1. the rows are cut into contiguous chunks of ``chunk_size`` rows (contiguous on disk, so
   one read per chunk); the chunk order is shuffled;
2. rank ``r`` of ``R`` (DDP) takes chunks ``r, r + R, ...``: ranks never overlap;
3. a rank's chunks are grouped ``buffer_chunks`` at a time into windows; inside a window
   the rows are shuffled, grouped by batch label (so every mini-batch holds one batch, as
   DSBN needs) and cut into mini-batches, whose order is shuffled (a bounded shuffle
   buffer of ``chunk_size x buffer_chunks`` rows);
4. DataLoader worker ``w`` of ``W`` takes its rank's windows ``w, w + W, ...``
   (:class:`celltune.data.streaming.StreamingCellDataset` does that);
5. with ``even_batches`` (the default under DDP) ranks with fewer mini-batches repeat their
   first ones so every rank steps the same number of times (as ``DistributedSampler``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from celltune.errors import InputError

#: Mixed into every planning RNG so streaming draws never collide with other consumers of
#: ``default_rng([seed, epoch, ...])`` (masks use ``[seed, epoch, cell_key]``).
_PLAN_TAG = 0x57AE


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


def chunk_spans(positions: np.ndarray, chunk_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sorted dataset positions grouped by the chunk (of ``chunk_size`` rows) they fall
    in: ``(mask into positions, positions of that chunk)`` per chunk touched."""
    chunk_of = positions // chunk_size
    return [(chunk_of == c, positions[chunk_of == c]) for c in np.unique(chunk_of)]


def dist_world_size() -> int:
    """The process group's size, else torchrun's ``WORLD_SIZE``: DataLoader workers and
    datasets built before ``init_process_group`` must still shard like their rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "RANK" in os.environ:
        return int(os.environ.get("WORLD_SIZE", "1"))
    return 1


def dist_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return 0


__all__ = [
    "Window",
    "chunk_spans",
    "dist_rank",
    "dist_world_size",
    "effective_chunk_size",
    "plan_epoch",
]
