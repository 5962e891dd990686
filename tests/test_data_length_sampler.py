"""LengthBucketedSampler on the real Kang 12k file: one batch label per mini-batch, every
cell once per epoch, seeded, rank-disjoint, and less padding than random mini-batches."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from celltune.data.sampler import BatchAwareSampler, LengthBucketedSampler
from celltune.errors import InputError


@pytest.fixture(scope="module")
def cells(kang_donors_path):
    """Donor labels and non-zero gene counts of the 12,261 real cells."""
    a = ad.read_h5ad(kang_donors_path)
    labels = np.asarray(a.obs["batch"].cat.codes, dtype=np.int64)
    return labels, np.diff(a.X.indptr)


def test_one_label_per_batch_and_every_cell_once(cells):
    labels, lengths = cells
    s = LengthBucketedSampler(labels, lengths, 64, seed=3)
    for epoch in (0, 1):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(len(set(labels[b])) == 1 for b in batches)
        flat = np.concatenate(batches)
        assert np.array_equal(np.sort(flat), np.arange(labels.size))


def test_seeded_and_epochs_differ(cells):
    labels, lengths = cells
    a = list(LengthBucketedSampler(labels, lengths, 64, seed=1))
    b = list(LengthBucketedSampler(labels, lengths, 64, seed=1))
    c = list(LengthBucketedSampler(labels, lengths, 64, seed=2))
    assert a == b
    assert a != c
    s = LengthBucketedSampler(labels, lengths, 64, seed=1)
    s.set_epoch(1)
    assert list(s) != a


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_disjoint_and_equal_length(cells, drop_last):
    labels, lengths = cells
    ranks = [
        list(
            LengthBucketedSampler(
                labels, lengths, 64, seed=0, num_replicas=3, rank=r, drop_last=drop_last
            )
        )
        for r in range(3)
    ]
    assert len({len(r) for r in ranks}) == 1
    seen = [set(np.concatenate(r).tolist()) for r in ranks]
    if drop_last:  # no padding repeats: the ranks' cells are disjoint
        assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert set().union(*seen) <= set(range(labels.size))


def test_less_padding_than_random_batches(cells):
    labels, lengths = cells

    def padded(sampler):
        return sum(len(b) * int(lengths[b].max()) for b in sampler) / lengths.sum()

    assert padded(LengthBucketedSampler(labels, lengths, 64, seed=0)) < 0.8 * padded(
        BatchAwareSampler(labels, 64, seed=0)
    )


def test_lengths_must_match(cells):
    labels, lengths = cells
    with pytest.raises(InputError, match="one length"):
        LengthBucketedSampler(labels, lengths[:-1], 64)
