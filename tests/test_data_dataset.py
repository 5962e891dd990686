"""CellDataset + TokenCollator (SPEC §2) on binned real Kang PBMC cells."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from celltune.data.binning import bin_matrix, cell_keys
from celltune.data.dataset import CellDataset, TokenCollator
from celltune.data.sampler import BatchAwareSampler
from celltune.data.vocab import GeneVocab
from celltune.errors import InputError

N_GENES = 300


@pytest.fixture(scope="module")
def adata(kang_stim_path):
    """240 real cells x 300 genes with an X_binned layer; every 10th gene not in the vocab."""
    a = ad.read_h5ad(kang_stim_path)[::6, :N_GENES].copy()
    a.layers["X_binned"] = bin_matrix(a.X, 51, seed=0, keys=cell_keys(a.obs_names))
    return a


@pytest.fixture(scope="module")
def vocab(adata):
    return GeneVocab.from_genes([g for i, g in enumerate(adata.var_names) if i % 10 != 0])


@pytest.fixture(scope="module")
def ds(adata, vocab):
    ids = vocab.match_genes(adata.var_names).ids
    return CellDataset(adata, ids, batch_key="batch", label_key="cell_type")


def make(ds, vocab, **kw):
    return ds.collator(cls_id=vocab.cls_id, pad_id=vocab.pad_id, **kw)


def dense_binned(adata, i):
    return adata.layers["X_binned"][i].toarray().ravel()


def test_items(ds, adata):
    assert len(ds) == adata.n_obs
    it = ds[5]
    row = adata.layers["X_binned"][5]
    assert it["index"] == 5 and it["key"] == cell_keys([adata.obs_names[5]])[0]
    np.testing.assert_array_equal(it["indices"], row.indices)
    np.testing.assert_array_equal(it["data"], row.data)
    assert ds.batch_categories == ["ctrl", "stim"]
    assert ds.batch_labels[5] == ds.batch_categories.index(adata.obs["batch"].iloc[5])
    assert ds.label_categories[it["celltype_label"]] == adata.obs["cell_type"].iloc[5]


def test_include_zero_gene_layout(ds, vocab, adata):
    col = make(ds, vocab, mask_ratio=0.0)
    batch = col([ds[i] for i in range(8)])
    kept = np.arange(N_GENES) % 10 != 0
    L = 1 + kept.sum()
    assert batch["gene_ids"].shape == batch["values"].shape == (8, L)
    assert batch["gene_ids"].dtype == torch.int64 and batch["values"].dtype == torch.float32
    assert (batch["gene_ids"][:, 0] == vocab.cls_id).all()
    assert (batch["values"][:, 0] == 0).all()  # cls_value
    genes = np.array(adata.var_names)[kept]
    assert batch["gene_ids"][0, 1:].tolist() == [vocab[g] for g in genes]
    for i in range(8):
        np.testing.assert_array_equal(
            batch["target_values"][i, 1:].numpy(), dense_binned(adata, i)[kept]
        )
    assert torch.equal(batch["values"], batch["target_values"])  # mask_ratio 0: no masking
    assert not batch["padding_mask"].any()
    assert batch["cell_index"].tolist() == list(range(8))
    assert batch["batch_labels"].tolist() == ds.batch_labels[:8].tolist()
    assert batch["celltype_labels"].tolist() == ds.celltype_labels[:8].tolist()


def test_nonzero_genes_only_and_padding(ds, vocab, adata):
    col = make(ds, vocab, include_zero_gene=False, mask_ratio=0.0, pad_value=-2)
    batch = col([ds[i] for i in range(10)])
    kept = np.arange(N_GENES) % 10 != 0
    lengths = [1 + int(((dense_binned(adata, i) > 0) & kept).sum()) for i in range(10)]
    assert batch["gene_ids"].shape[1] == max(lengths)
    for i, n in enumerate(lengths):
        assert (~batch["padding_mask"][i]).sum() == n
        assert (batch["gene_ids"][i, n:] == vocab.pad_id).all()
        assert (batch["values"][i, n:] == -2).all() and (batch["target_values"][i, n:] == -2).all()
        assert (batch["values"][i, 1:n] > 0).all()
        v = dense_binned(adata, i)
        for gid, val in zip(
            batch["gene_ids"][i, 1:n].tolist(), batch["values"][i, 1:n].tolist(), strict=True
        ):
            assert v[list(adata.var_names).index(vocab.id_to_token(gid))] == val


def test_masking_counts_positions_and_epochs(ds, vocab):
    col = make(ds, vocab, include_zero_gene=False, mask_ratio=0.4, seed=3)
    items = [ds[i] for i in range(16)]
    b0 = col(items)
    masked = b0["values"] == -1
    n_genes = (~b0["padding_mask"]).sum(1) - 1  # non-padding positions besides <cls>
    assert masked.sum(1).tolist() == [math.floor(0.4 * n) for n in n_genes.tolist()]
    assert not (masked & b0["padding_mask"]).any()  # never a padding position
    assert not masked[:, 0].any()  # <cls> excluded by default
    assert torch.equal(
        b0["target_values"][masked] > 0, torch.ones(int(masked.sum()), dtype=torch.bool)
    )
    assert torch.equal(col(items)["values"], b0["values"])  # same seed + epoch: same mask
    col.set_epoch(1)
    b1 = col(items)
    assert not torch.equal(b1["values"], b0["values"])  # a new mask each epoch
    assert torch.equal(b1["target_values"], b0["target_values"])
    assert (b1["values"] == -1).sum(1).tolist() == masked.sum(1).tolist()
    other_seed = make(ds, vocab, include_zero_gene=False, mask_ratio=0.4, seed=4)(items)
    assert not torch.equal(other_seed["values"], b0["values"])


def test_mask_cls_reproduces_scgpt_count(ds, vocab):
    col = make(ds, vocab, mask_ratio=0.5, mask_cls=True)
    batch = col([ds[i] for i in range(40)])
    n = (~batch["padding_mask"]).sum(1)
    masked = batch["values"] == -1
    assert masked.sum(1).tolist() == [math.floor(0.5 * k) for k in n.tolist()]
    assert masked[:, 0].any()  # <cls> can now be drawn


def test_mask_independent_of_batch_composition(ds, vocab):
    col = make(ds, vocab, include_zero_gene=False, mask_ratio=0.4)
    a = col([ds[i] for i in (0, 1, 2, 3)])
    b = col([ds[i] for i in (9, 3, 7)])
    n = int((~a["padding_mask"][3]).sum())
    assert torch.equal(a["values"][3, :n], b["values"][1, :n])


def test_max_seq_len_sampling(ds, vocab, adata):
    col = make(ds, vocab, include_zero_gene=True, max_seq_len=51, mask_ratio=0.0, seed=1)
    a = col([ds[i] for i in range(6)])
    assert a["gene_ids"].shape == (6, 51)
    assert (a["gene_ids"][:, 0] == vocab.cls_id).all()  # <cls> always kept
    assert not a["padding_mask"].any()
    for i in range(6):
        ids = a["gene_ids"][i, 1:].tolist()
        assert len(set(ids)) == 50 and vocab.pad_id not in ids
        v = dense_binned(adata, i)
        names = list(adata.var_names)
        for gid, val in zip(ids, a["values"][i, 1:].tolist(), strict=True):
            assert v[names.index(vocab.id_to_token(gid))] == val
    assert not torch.equal(a["gene_ids"][0], a["gene_ids"][1])  # a per-cell draw
    # the same cell gets the same genes whatever its mini-batch (scGPT #319)
    b = col([ds[i] for i in (5, 4, 100)])
    assert torch.equal(a["gene_ids"][5], b["gene_ids"][0])
    assert torch.equal(a["gene_ids"][4], b["gene_ids"][1])
    col.set_epoch(1)
    assert not torch.equal(col([ds[5]])["gene_ids"][0], a["gene_ids"][5])


def test_no_cls(ds, vocab):
    col = make(ds, vocab, append_cls=False, include_zero_gene=False, mask_ratio=0.25)
    batch = col([ds[i] for i in range(4)])
    assert vocab.cls_id not in batch["gene_ids"].tolist()
    n = (~batch["padding_mask"]).sum(1)
    assert (batch["values"] == -1).sum(1).tolist() == [math.floor(0.25 * k) for k in n.tolist()]


def test_dense_layer_and_no_labels(adata, vocab):
    dense = adata.copy()
    dense.layers["X_binned"] = dense.layers["X_binned"].toarray()
    ids = vocab.match_genes(dense.var_names).ids
    d = CellDataset(dense, ids)
    s = CellDataset(adata, ids)
    np.testing.assert_array_equal(d[7]["data"], s[7]["data"])
    col = d.collator(cls_id=vocab.cls_id, pad_id=vocab.pad_id)
    batch = col([d[i] for i in range(3)])
    assert batch["celltype_labels"].tolist() == [-1, -1, -1]
    assert batch["batch_labels"].tolist() == [0, 0, 0]


def test_dataloader_with_batch_aware_sampler(ds, vocab):
    sampler = BatchAwareSampler(ds.batch_labels, 32, seed=0)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=make(ds, vocab, include_zero_gene=False)
    )
    seen = []
    for batch in loader:
        assert batch["batch_labels"].unique().numel() == 1
        seen.extend(batch["cell_index"].tolist())
    assert sorted(seen) == list(range(len(ds)))


def test_bad_input(adata, vocab):
    ids = vocab.match_genes(adata.var_names).ids
    with pytest.raises(InputError, match=r"X_binned.*celltune preprocess"):
        CellDataset(ad.AnnData(sp.csr_matrix(adata.X)), ids)
    with pytest.raises(InputError, match="gene_ids has 3 entries"):
        CellDataset(adata, ids[:3])
    with pytest.raises(InputError, match="vocabulary"):
        CellDataset(adata, np.full(adata.n_vars, -1))
    with pytest.raises(InputError, match="not in the given categories"):
        CellDataset(adata, ids, batch_key="batch", batch_categories=["ctrl"])
    with pytest.raises(InputError, match="'batchx'"):
        CellDataset(adata, ids, batch_key="batchx")
    with pytest.raises(InputError, match="mask_ratio"):
        TokenCollator(n_genes=adata.n_vars, gene_ids=ids, cls_id=1, pad_id=0, mask_ratio=1.5)
    with pytest.raises(InputError, match="max_seq_len"):
        TokenCollator(n_genes=adata.n_vars, gene_ids=ids, cls_id=1, pad_id=0, max_seq_len=1)
