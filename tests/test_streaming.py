"""Streaming from an on-disk .h5ad (celltune.data.streaming) on real Kang PBMC data.

What must hold for training on files larger than memory: every cell exactly once per
epoch (also split over DDP ranks and DataLoader workers), every mini-batch within one
batch label (DSBN), a bounded shuffle buffer, the same tokens for a cell as the in-memory
path, and memory that does not grow with the file.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from celltune.data.binning import bin_matrix, cell_keys
from celltune.data.dataset import CellDataset, TokenCollator
from celltune.data.streaming import (
    StreamingCellDataset,
    effective_chunk_size,
    read_cells,
    replicate_h5ad,
    sample_rows,
)
from celltune.errors import InputError

BATCH_KEY = "sample_id"  # 4 samples in the 1,556-cell file
SEED = 7
CLS_ID, PAD_ID = 5000, 5001


@pytest.fixture(scope="module")
def kang(kang_stim_path: Path) -> anndata.AnnData:
    return anndata.read_h5ad(kang_stim_path)


@pytest.fixture(scope="module")
def kang_file(kang, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp copy of the real file, written sparse (CSR) and uncompressed."""
    path = tmp_path_factory.mktemp("stream") / "kang_csr.h5ad"
    ad = kang.copy()
    ad.X = sp.csr_matrix(ad.X)
    ad.write_h5ad(path)
    return path


def _all_batches(ds: StreamingCellDataset) -> list[list[dict]]:
    return list(iter(ds))


def test_every_cell_once_and_batches_within_one_batch(kang, kang_file: Path) -> None:
    ds = StreamingCellDataset(
        kang_file,
        np.arange(kang.n_vars),
        batch_key=BATCH_KEY,
        batch_size=32,
        chunk_size=100,
        buffer_chunks=3,
        seed=SEED,
    )
    batches = _all_batches(ds)
    assert len(batches) == len(ds)
    seen = np.concatenate([[it["index"] for it in mb] for mb in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(kang.n_obs))
    codes = kang.obs[BATCH_KEY].cat.codes.to_numpy()
    for mb in batches:
        labels = {it["batch_label"] for it in mb}
        assert len(labels) == 1 and len(mb) <= 32
        assert {codes[it["index"]] for it in mb} == labels  # labels match the file
    # bounded shuffle buffer: a window spans at most buffer_chunks chunks of rows
    for window in ds.plan():
        chunks = np.unique(np.concatenate(window.batches) // 100)
        assert chunks.size <= 3
    # shuffled: neither file order nor a single label run
    assert not np.array_equal(seen, np.arange(kang.n_obs))


def test_epochs_reshuffle_reproducibly(kang, kang_file: Path) -> None:
    def order(epoch: int) -> np.ndarray:
        ds = StreamingCellDataset(
            kang_file, np.arange(kang.n_vars), batch_key=BATCH_KEY, chunk_size=200, seed=SEED
        )
        ds.set_epoch(epoch)
        return np.concatenate([[it["index"] for it in mb] for mb in plan_items(ds)])

    def plan_items(ds: StreamingCellDataset) -> list[list[dict]]:
        return [[{"index": int(p)} for p in b] for w in ds.plan() for b in w.batches]

    a0, b0, a1 = order(0), order(0), order(1)
    np.testing.assert_array_equal(a0, b0)
    assert not np.array_equal(a0, a1)
    np.testing.assert_array_equal(np.sort(a0), np.sort(a1))


def _in_memory(kang, var_subset: np.ndarray, gene_ids: np.ndarray) -> CellDataset:
    """The in-memory path: bin the whole (column-subset) matrix, then CellDataset."""
    X = sp.csr_matrix(kang.X)[:, var_subset]
    binned = bin_matrix(X, 51, SEED, cell_keys(kang.obs_names))
    mem = anndata.AnnData(X=binned, obs=kang.obs.copy())
    mem.layers["X_binned"] = binned
    return CellDataset(mem, gene_ids, layer="X_binned", batch_key=BATCH_KEY)


@pytest.mark.parametrize("include_zero_gene", [True, False])
def test_same_tokens_as_in_memory_path(kang, kang_file: Path, include_zero_gene: bool) -> None:
    var_subset = np.arange(0, kang.n_vars, 2)  # an "HVG" subset of columns
    gene_ids = np.arange(var_subset.size, dtype=np.int64)
    gene_ids[::17] = -1  # genes missing from the vocabulary are dropped after binning
    mem = _in_memory(kang, var_subset, gene_ids)
    coll = TokenCollator(
        n_genes=var_subset.size,
        gene_ids=gene_ids,
        cls_id=CLS_ID,
        pad_id=PAD_ID,
        include_zero_gene=include_zero_gene,
        max_seq_len=301 if include_zero_gene else 201,  # forces per-cell gene sub-sampling
        seed=SEED,
    )
    ds = StreamingCellDataset(
        kang_file,
        gene_ids,
        var_subset=var_subset,
        batch_key=BATCH_KEY,
        batch_size=64,
        chunk_size=256,
        buffer_chunks=2,
        seed=SEED,
    )
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        coll.set_epoch(epoch)
        n = 0
        for batch in ds.loader(coll):
            idx = batch["cell_index"].numpy()
            ref = coll([mem[int(i)] for i in idx])
            for key, value in ref.items():
                assert torch.equal(batch[key], value), (epoch, key)
            n += idx.size
        assert n == kang.n_obs


def test_dense_x_streams_like_sparse(kang, tmp_path: Path) -> None:
    dense = tmp_path / "dense.h5ad"
    ad = kang[:300].copy()
    ad.X = np.asarray(sp.csr_matrix(ad.X).toarray())
    ad.write_h5ad(dense)
    ds = StreamingCellDataset(dense, np.arange(kang.n_vars), shuffle=False, chunk_size=128)
    block, keys = ds.read_positions(np.arange(300))
    expected = bin_matrix(sp.csr_matrix(kang.X[:300]), 51, 0, cell_keys(kang.obs_names[:300]))
    np.testing.assert_array_equal(keys, cell_keys(kang.obs_names[:300]))
    assert (block != expected).nnz == 0


def test_prebinned_layer_is_streamed_unchanged(kang, tmp_path: Path) -> None:
    path = tmp_path / "binned.h5ad"
    ad = kang[:400].copy()
    binned = bin_matrix(sp.csr_matrix(ad.X), 51, SEED, cell_keys(ad.obs_names))
    ad.layers["X_binned"] = binned
    ad.write_h5ad(path)
    ds = StreamingCellDataset(
        path, np.arange(kang.n_vars), layer="X_binned", n_bins=None, shuffle=False
    )
    block, _ = ds.read_positions(np.arange(400))
    assert (block != binned).nnz == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_never_overlap(kang, kang_file: Path, workers: int) -> None:
    seen: list[np.ndarray] = []
    for rank in range(2):
        ds = StreamingCellDataset(
            kang_file,
            np.arange(kang.n_vars),
            batch_key=BATCH_KEY,
            batch_size=32,
            chunk_size=100,
            buffer_chunks=2,
            num_replicas=2,
            rank=rank,
            even_batches=False,
            seed=SEED,
        )
        got = [np.array([it["index"] for it in mb]) for mb in ds.loader(None, num_workers=workers)]
        assert len(got) == len(ds)
        seen.append(np.concatenate(got))
    both = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(both), np.arange(kang.n_obs))  # disjoint + complete


def test_even_batches_for_ddp(kang, kang_file: Path) -> None:
    lengths, cells = [], []
    for rank in range(3):
        ds = StreamingCellDataset(
            kang_file,
            np.arange(kang.n_vars),
            batch_key=BATCH_KEY,
            batch_size=32,
            chunk_size=100,
            num_replicas=3,
            rank=rank,
            seed=SEED,
        )
        batches = _all_batches(ds)
        lengths.append(len(batches))
        cells.append(np.concatenate([[it["index"] for it in mb] for mb in batches]))
        assert all(len({it["batch_label"] for it in mb}) == 1 for mb in batches)
    assert len(set(lengths)) == 1  # every rank steps the same number of times
    assert set(np.concatenate(cells).tolist()) == set(range(kang.n_obs))


def test_row_subset(kang, kang_file: Path) -> None:
    rows = np.flatnonzero(np.arange(kang.n_obs) % 10 != 3)  # e.g. a training split
    ds = StreamingCellDataset(
        kang_file, np.arange(kang.n_vars), rows=rows, batch_key=BATCH_KEY, chunk_size=128
    )
    seen = np.concatenate([[it["index"] for it in mb] for mb in _all_batches(ds)])
    np.testing.assert_array_equal(np.sort(seen), rows)


def _stream_peak(path: Path, n_vars: int, n_windows: int) -> tuple[int, int]:
    """tracemalloc peak (bytes) of opening + planning + streaming ``n_windows`` windows."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        ds = StreamingCellDataset(
            path, np.arange(n_vars), batch_key="batch", chunk_size=256, buffer_chunks=4
        )
        windows = ds.plan()[:n_windows]
        cells = sum(len(mb) for w in windows for mb in ds._window_items(w))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, cells


def test_memory_does_not_grow_with_the_file(kang_donors_path: Path, tmp_path: Path) -> None:
    """12k real cells and the same replicated 6x (74k): the same peak, far below the matrix."""
    one = replicate_h5ad(kang_donors_path, tmp_path / "x1.h5ad", 1)
    six = replicate_h5ad(kang_donors_path, tmp_path / "x6.h5ad", 6)
    ad = anndata.read_h5ad(one, backed="r")
    n_vars = ad.n_vars
    ad.file.close()
    with h5py.File(one, "r") as f:
        matrix_bytes = f["X/data"].nbytes + f["X/indices"].nbytes
    peak1, cells1 = _stream_peak(one, n_vars, 4)
    peak6, cells6 = _stream_peak(six, n_vars, 4)
    assert 3 * 1024 < cells1 <= 4 * 1024 and 3 * 1024 < cells6 <= 4 * 1024  # one chunk may be short
    assert peak6 < 1.2 * peak1, (peak1, peak6)
    # a window is 1,024 rows; reading the whole 1x matrix would be >= 100%
    assert peak1 < 0.6 * matrix_bytes, (peak1, matrix_bytes)


def test_replicate_h5ad_writes_the_same_cells(kang, kang_file: Path, tmp_path: Path) -> None:
    path = replicate_h5ad(kang_file, tmp_path / "rep.h5ad", 3, chunk_rows=500)
    with h5py.File(path) as f:
        assert f["X/data"].compression == "gzip" and f["X/indices"].compression == "gzip"
    rep = anndata.read_h5ad(path)
    assert rep.n_obs == 3 * kang.n_obs and rep.obs_names.is_unique
    assert (sp.vstack([sp.csr_matrix(kang.X)] * 3) != rep.X).nnz == 0
    np.testing.assert_array_equal(
        rep.obs[BATCH_KEY].astype(str), np.tile(kang.obs[BATCH_KEY].astype(str), 3)
    )


def test_read_cells_and_sample_rows(kang, kang_file: Path) -> None:
    labels = kang.obs[BATCH_KEY].cat.codes.to_numpy()
    rows = sample_rows(kang.n_obs, 200, seed=1, batch_labels=labels)
    assert np.all(np.diff(rows) > 0) and abs(rows.size - 200) <= 4
    sub = read_cells(kang_file, rows, obs_keys=[BATCH_KEY], chunk_size=300)
    assert sub.n_obs == rows.size
    assert list(sub.obs_names) == list(kang.obs_names[rows])
    assert (sp.csr_matrix(kang.X)[rows] != sub.X).nnz == 0
    assert list(sub.obs[BATCH_KEY].astype(str)) == list(kang.obs[BATCH_KEY].astype(str)[rows])


def test_small_data_many_ranks_get_a_chunk_each() -> None:
    assert effective_chunk_size(10, 1024, 4) == 3
    assert effective_chunk_size(10_000, 1024, 2) == 1024


def test_bad_input_is_a_clear_error(kang, kang_file: Path, tmp_path: Path) -> None:
    ids = np.arange(kang.n_vars)
    with pytest.raises(InputError, match="not found"):
        StreamingCellDataset(tmp_path / "missing.h5ad", ids)
    not_h5 = tmp_path / "x.h5ad"
    not_h5.write_text("hello")
    with pytest.raises(InputError, match=r"not an \.h5ad"):
        StreamingCellDataset(not_h5, ids)
    with pytest.raises(InputError, match="available obs columns"):
        StreamingCellDataset(kang_file, ids, batch_key="donorz")
    with pytest.raises(InputError, match="layer 'counts' not found"):
        StreamingCellDataset(kang_file, ids, layer="counts")
    with pytest.raises(InputError, match="gene_ids has"):
        StreamingCellDataset(kang_file, ids[:10])
    with pytest.raises(InputError, match="var_subset"):
        StreamingCellDataset(kang_file, ids[:2], var_subset=[0, kang.n_vars])
    with pytest.raises(InputError, match="strictly increasing"):
        StreamingCellDataset(kang_file, ids, rows=[5, 3])
    csc = tmp_path / "csc.h5ad"
    ad = kang[:50].copy()
    ad.X = sp.csc_matrix(ad.X)
    ad.write_h5ad(csc)
    with pytest.raises(InputError, match="CSC"):
        StreamingCellDataset(csc, ids)


@pytest.mark.e2e
def test_trainer_fits_from_a_stream(kang, kang_file: Path, tmp_path: Path) -> None:
    """The real training loop on a streamed loader: epochs, set_epoch and len all work."""
    from celltune.losses import IntegrationObjective
    from celltune.model import CellTransformer, ModelConfig
    from celltune.train import TrainConfig, Trainer

    torch.manual_seed(0)
    var_subset = np.arange(0, kang.n_vars, 8)  # 159 genes: a small, fast model
    g = var_subset.size
    ds = StreamingCellDataset(
        kang_file,
        np.arange(g),
        var_subset=var_subset,
        rows=np.arange(0, kang.n_obs, 8),  # 195 cells
        batch_key=BATCH_KEY,
        batch_size=32,
        chunk_size=64,
        buffer_chunks=2,
        seed=SEED,
    )
    coll = TokenCollator(n_genes=g, gene_ids=np.arange(g), cls_id=g, pad_id=g + 1, seed=SEED)
    model = CellTransformer(
        ModelConfig(
            ntoken=g + 3,
            d_model=16,
            nhead=2,
            d_hid=16,
            nlayers=1,
            pad_id=g + 1,
            do_mvc=True,
            do_dab=True,
            use_batch_labels=True,
            num_batch_labels=len(ds.batch_categories),
            domain_spec_batchnorm=True,
        )
    )
    objective = IntegrationObjective()
    seen: list[np.ndarray] = []

    def step_fn(net: torch.nn.Module, batch: dict, ctx: object) -> tuple:
        seen.append(batch["cell_index"].numpy())
        assert batch["batch_labels"].unique().numel() == 1
        out = net(
            batch["gene_ids"],
            batch["values"],
            padding_mask=batch["padding_mask"],
            batch_labels=batch["batch_labels"],
            MVC=True,
        )
        mask = batch["values"].eq(-1) & ~batch["padding_mask"]
        return objective(out, batch, mask)

    cfg = TrainConfig(epochs=2, lr=1e-3, quiet=True, device="cpu", amp="off")
    history = Trainer(model, cfg, step_fn=step_fn, out_dir=tmp_path / "run").fit(
        ds.loader(coll, num_workers=2)
    )
    assert len(history) == 2 and all(np.isfinite(history["train/loss"]))
    per_epoch = np.array_split(np.concatenate(seen), 2)
    for cells in per_epoch:  # each epoch: every streamed cell exactly once
        np.testing.assert_array_equal(np.sort(cells), np.arange(0, kang.n_obs, 8))


def test_streamed_raw_counts_bin_like_preprocess(kang, kang_file: Path) -> None:
    """Streaming the raw counts of the HVG columns gives preprocess()'s X_binned exactly
    (binning is per cell and invariant to normalise + log1p), so a streamed run needs no
    preprocessed copy of the file."""
    from celltune.data.preprocess import preprocess

    pp = preprocess(kang, n_hvg=600, batch_key="batch", seed=SEED, quiet=True)
    cols = np.flatnonzero(kang.var_names.isin(pp.var_names))
    assert list(kang.var_names[cols]) == list(pp.var_names)
    rows = np.flatnonzero(kang.obs_names.isin(pp.obs_names))
    ds = StreamingCellDataset(
        kang_file, np.arange(cols.size), var_subset=cols, rows=rows, seed=SEED, shuffle=False
    )
    block, _ = ds.read_positions(np.arange(rows.size))
    assert (block != sp.csr_matrix(pp.layers["X_binned"])).nnz == 0


def test_rank_from_torchrun_environment(kang, kang_file: Path, monkeypatch) -> None:
    """Built under torchrun before the process group exists (or in a DataLoader worker),
    the dataset still shards by the launcher's RANK / WORLD_SIZE."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = StreamingCellDataset(kang_file, np.arange(kang.n_vars), chunk_size=100, seed=SEED)
    assert (ds.num_replicas, ds.rank) == (2, 1)
    explicit = StreamingCellDataset(
        kang_file, np.arange(kang.n_vars), chunk_size=100, seed=SEED, num_replicas=2, rank=1
    )
    mine = [b.tolist() for w in ds.plan() for b in w.batches]
    assert mine == [b.tolist() for w in explicit.plan() for b in w.batches]
