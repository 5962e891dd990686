"""A batch sampler whose mini-batches each hold cells of a single batch label.

Domain-specific batch norm (DSBN) normalises a mini-batch with its batch's statistics, so
each mini-batch must come from one batch (SPEC §3). Cells are shuffled within each batch,
cut into mini-batches, and the mini-batches of all batches are shuffled together, from
``np.random.default_rng([seed, epoch])`` only.

:class:`LengthBucketedSampler` adds "sortish" bucketing: real cells are short (a median
of ~250 non-zero genes of 1,200 HVGs on Kang) and a mini-batch is padded to its longest
cell, so grouping cells of similar length cuts the padded tokens (and attention's
quadratic cost) without changing which cells an epoch sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from celltune.errors import InputError


class BatchAwareSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; pass it as ``DataLoader(batch_sampler=...)``.

    With ``num_replicas > 1`` (DDP) every rank walks the same global order and takes
    mini-batches ``rank, rank + R, ...``; the order is padded by repeating its first
    mini-batches (or truncated with ``drop_last``) so every rank gets the same number.
    """

    def __init__(
        self,
        batch_labels: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.batch_labels = np.asarray(batch_labels)
        if self.batch_labels.ndim != 1 or self.batch_labels.size == 0:
            raise InputError("batch_labels must be a non-empty 1-D array (one label per cell)")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1 (got {batch_size})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise InputError(f"need 0 <= rank < num_replicas (got rank={rank}, {num_replicas})")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self._groups = [
            np.flatnonzero(self.batch_labels == lab) for lab in np.unique(self.batch_labels)
        ]
        n_global = self._n_global()
        if n_global == 0:
            raise InputError(
                f"no mini-batch of {batch_size} cells can be formed with drop_last=True "
                "(every batch has fewer cells); lower batch_size or set drop_last=False"
            )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (all ranks must call it with the same value)."""
        self.epoch = int(epoch)

    def _n_global(self) -> int:
        per = (
            (g.size // self.batch_size) if self.drop_last else math.ceil(g.size / self.batch_size)
            for g in self._groups
        )
        return sum(per)

    def _global_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[np.ndarray] = []
        for g in self._groups:
            idx = rng.permutation(g) if self.shuffle else g
            for start in range(0, idx.size, self.batch_size):
                chunk = idx[start : start + self.batch_size]
                if self.drop_last and chunk.size < self.batch_size:
                    break
                batches.append(chunk)
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def __len__(self) -> int:
        n = self._n_global()
        if self.drop_last:
            return n // self.num_replicas
        return math.ceil(n / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        per_rank = len(self)
        total = per_rank * self.num_replicas
        if total > len(batches):  # pad by repeating from the start (DistributedSampler style)
            reps = math.ceil(total / len(batches))
            batches = (batches * reps)[:total]
        else:
            batches = batches[:total]
        for b in batches[self.rank : total : self.num_replicas]:
            yield b.tolist()


class LengthBucketedSampler(BatchAwareSampler):
    """:class:`BatchAwareSampler` whose mini-batches hold cells of similar length.

    Within each batch label the shuffled cells are cut into pools of
    ``batch_size * pool_batches`` cells; each pool is sorted by ``lengths`` (e.g. the
    non-zero count per cell) and cut into mini-batches, and all mini-batches are then
    shuffled together. Every guarantee of the parent holds: one batch label per
    mini-batch, every cell once per epoch (``drop_last=False``), the same order for the
    same ``(seed, epoch)``, disjoint mini-batches across DDP ranks.
    """

    def __init__(
        self,
        batch_labels: Sequence[int] | np.ndarray,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        pool_batches: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_labels, batch_size, **kwargs)
        self.lengths = np.asarray(lengths)
        if self.lengths.shape != self.batch_labels.shape:
            raise InputError(
                f"lengths has {self.lengths.size} entries for {self.batch_labels.size} cells; "
                "pass one length (non-zero gene count) per cell"
            )
        if pool_batches < 1:
            raise InputError(f"pool_batches must be >= 1 (got {pool_batches}); 50 is typical")
        self.pool_batches = int(pool_batches)

    def _global_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pool = self.batch_size * self.pool_batches
        batches: list[np.ndarray] = []
        for g in self._groups:
            idx = rng.permutation(g) if self.shuffle else g
            for p0 in range(0, idx.size, pool):
                chunk = idx[p0 : p0 + pool]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                for start in range(0, chunk.size, self.batch_size):
                    mb = chunk[start : start + self.batch_size]
                    if self.drop_last and mb.size < self.batch_size:
                        continue
                    batches.append(mb)
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches
