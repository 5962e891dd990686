"""BatchAwareSampler: single-batch mini-batches, shuffling, reproducibility, DDP sharding."""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pytest

from celltune.data.sampler import BatchAwareSampler
from celltune.errors import InputError


@pytest.fixture(scope="module")
def labels(kang_donors_path):
    """The 8 real donor labels of the 12k-cell Kang file (408 to 2,738 cells per donor)."""
    obs = ad.read_h5ad(kang_donors_path, backed="r").obs
    return np.asarray(obs["batch"].cat.codes, dtype=np.int64)


def test_every_batch_from_one_label_and_all_cells_once(labels):
    s = BatchAwareSampler(labels, 64, seed=0)
    batches = list(s)
    assert len(batches) == len(s)
    assert all(len(set(labels[b])) == 1 for b in batches)
    assert all(1 <= len(b) <= 64 for b in batches)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(labels.size))
    counts = np.bincount(labels)
    assert len(s) == sum(-(-c // 64) for c in counts)


def test_shuffled_within_and_across_batches(labels):
    batches = list(BatchAwareSampler(labels, 64, seed=0))
    order = [int(labels[b[0]]) for b in batches]
    changes = sum(a != b for a, b in itertools.pairwise(order))
    assert changes > len(order) / 2  # labels interleave, not one block per label
    first = batches[0]
    assert first != sorted(first)  # cells are shuffled inside a label


def test_reproducible_and_new_each_epoch(labels):
    a, b = BatchAwareSampler(labels, 64, seed=7), BatchAwareSampler(labels, 64, seed=7)
    assert list(a) == list(b)
    assert list(a) != list(BatchAwareSampler(labels, 64, seed=8))
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0
    a.set_epoch(0)
    assert list(a) == e0


def test_no_shuffle_is_ordered(labels):
    batches = list(BatchAwareSampler(labels, 100, shuffle=False))
    flat = np.concatenate(batches)
    assert np.array_equal(flat, np.concatenate([np.flatnonzero(labels == k) for k in range(8)]))


def test_drop_last(labels):
    s = BatchAwareSampler(labels, 64, drop_last=True)
    batches = list(s)
    assert all(len(b) == 64 for b in batches)
    assert len(batches) == len(s) == sum(c // 64 for c in np.bincount(labels))
    with pytest.raises(InputError, match="drop_last"):
        BatchAwareSampler(labels, 10_000, drop_last=True)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_shards(labels, drop_last):
    R = 3
    shards = [
        list(BatchAwareSampler(labels, 64, seed=1, num_replicas=R, rank=r, drop_last=drop_last))
        for r in range(R)
    ]
    lens = {len(s) for s in shards}
    assert len(lens) == 1  # every rank runs the same number of steps
    single = list(BatchAwareSampler(labels, 64, seed=1, drop_last=drop_last))
    # rank r takes mini-batches r, r+R, ... of the one global order
    for r in range(R):
        n = len(shards[r])
        assert shards[r] == [(single * 2)[r + R * k] for k in range(n)]
    all_cells = np.concatenate([np.concatenate(s) for s in shards])
    if drop_last:
        assert len(all_cells) == len(set(all_cells.tolist()))  # disjoint
    else:
        assert set(all_cells.tolist()) == set(range(labels.size))  # nothing left out


def test_bad_arguments(labels):
    with pytest.raises(InputError, match="batch_size"):
        BatchAwareSampler(labels, 0)
    with pytest.raises(InputError, match="rank"):
        BatchAwareSampler(labels, 8, num_replicas=2, rank=2)
    with pytest.raises(InputError, match="non-empty"):
        BatchAwareSampler([], 8)
