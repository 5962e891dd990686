"""CellSource (celltune.data.source): the in-memory and the on-disk sources give the same
answers on the real Kang 2018 ctrl/stim PBMC file, as .h5ad and as a .zarr copy."""

from __future__ import annotations

import pickle
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltune.data.source import (
    AnnDataSource,
    CellSource,
    StoreSource,
    open_source,
    sample_rows,
)
from celltune.errors import InputError

KEY = "sample_id"  # 4 samples; categorical


@pytest.fixture(scope="module")
def kang(kang_stim_path: Path) -> anndata.AnnData:
    return anndata.read_h5ad(kang_stim_path)


@pytest.fixture(scope="module")
def zarr_path(kang, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "kang.zarr"
    kang.write_zarr(path)
    return path


@pytest.fixture(scope="module", params=["memory", "h5ad", "zarr"])
def source(request, kang, kang_stim_path: Path, zarr_path: Path) -> CellSource:
    return {
        "memory": lambda: AnnDataSource(kang),
        "h5ad": lambda: StoreSource(kang_stim_path),
        "zarr": lambda: StoreSource(zarr_path),
    }[request.param]()


def test_metadata_matches_the_anndata(source: CellSource, kang) -> None:
    assert source.shape == kang.shape and (source.n_obs, source.n_vars) == kang.shape
    assert list(source.var_names()) == list(kang.var_names)
    assert list(source.obs_names(10, 20)) == list(kang.obs_names[10:20])
    assert list(source.obs_names()) == list(kang.obs_names)
    assert set(source.obs_keys()) == set(kang.obs.columns)
    col = source.obs_column(KEY)
    assert isinstance(col.dtype, pd.CategoricalDtype)
    assert list(col.astype(str)) == list(kang.obs[KEY].astype(str))
    pd.testing.assert_frame_equal(
        source.obs_frame(np.array([3, 7])).reset_index(drop=True),
        kang.obs.iloc[[3, 7]].reset_index(drop=True),
    )


def test_codes_follow_the_categorical_order(source: CellSource, kang) -> None:
    codes, cats = source.obs_codes(KEY, None, "a test")
    assert cats == list(kang.obs[KEY].cat.categories) and codes.dtype == np.int8
    np.testing.assert_array_equal(codes, kang.obs[KEY].cat.codes.to_numpy())
    rev = cats[::-1]
    codes2, cats2 = source.obs_codes(KEY, rev, "a test")
    assert cats2 == rev
    np.testing.assert_array_equal(np.asarray(rev)[codes2], kang.obs[KEY].astype(str))


def test_rows_by_range_and_by_index(source: CellSource, kang) -> None:
    X = sp.csr_matrix(kang.X, dtype=np.float32)
    block = source.read_rows(100, 357)
    assert isinstance(block, sp.csr_matrix) and block.dtype == np.float32
    assert (block != X[100:357]).nnz == 0
    rows = source.sample(200, seed=3, batch_labels=source.obs_codes(KEY, None, "t")[0])
    np.testing.assert_array_equal(
        rows, sample_rows(kang.n_obs, 200, 3, kang.obs[KEY].cat.codes.to_numpy())
    )
    picked = source.take(rows, chunk_rows=97)  # many short contiguous reads
    assert (picked != X[rows]).nnz == 0
    assert list(source.take_names(rows, chunk_rows=97)) == list(kang.obs_names[rows])
    sub = source.to_anndata(rows, obs_keys=[KEY])
    assert list(sub.obs_names) == list(kang.obs_names[rows])
    assert list(sub.obs[KEY].astype(str)) == list(kang.obs[KEY].astype(str).iloc[rows])


def test_store_sources_pickle_without_a_handle(kang_stim_path: Path, zarr_path: Path) -> None:
    for path in (kang_stim_path, zarr_path):
        src = StoreSource(path)
        src.read_rows(0, 5)  # opens the handle
        clone = pickle.loads(pickle.dumps(src))  # what a DataLoader worker receives
        assert clone._root is None
        assert (clone.read_rows(0, 5) != src.read_rows(0, 5)).nnz == 0
        src.close()


def test_open_source_dispatches(kang, kang_stim_path: Path, zarr_path: Path) -> None:
    assert isinstance(open_source(kang), AnnDataSource)
    assert isinstance(open_source(str(kang_stim_path)), StoreSource)
    z = open_source(zarr_path)
    assert isinstance(z, StoreSource) and z.format == "zarr"
    assert open_source(z) is z


def test_bad_path_or_format_is_one_clear_error(kang, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        StoreSource(tmp_path / "missing.h5ad")
    text = tmp_path / "x.h5ad"
    text.write_text("hello")
    with pytest.raises(InputError, match=r"not an \.h5ad"):
        StoreSource(text)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(InputError, match=r"not a \.zarr store"):
        StoreSource(tmp_path / "plain_dir")
    csc = tmp_path / "csc.h5ad"
    ad = kang[:50].copy()
    ad.X = sp.csc_matrix(ad.X)
    ad.write_h5ad(csc)
    with pytest.raises(InputError, match="CSC"):
        StoreSource(csc)
    with pytest.raises(InputError, match="layer 'counts' not found"):
        StoreSource(csc, layer="counts")
    with pytest.raises(InputError, match=r"'donorz'.*available obs columns"):
        AnnDataSource(kang).obs_codes("donorz", None, "a test")
    with pytest.raises(InputError, match="strictly increasing"):
        AnnDataSource(kang).take([5, 3])


def test_streaming_gives_the_same_cells_from_every_source(
    kang, kang_stim_path: Path, zarr_path: Path
) -> None:
    """StreamingCellDataset over .h5ad, .zarr and an AnnData: the same binned cells."""
    from celltune.data.streaming import StreamingCellDataset

    def items(src: object) -> list[tuple[int, int, bytes, bytes]]:
        ds = StreamingCellDataset(
            src, np.arange(50), var_subset=np.arange(0, 100, 2), batch_key=KEY,
            chunk_size=128, buffer_chunks=2, seed=5,
        )  # fmt: skip
        return [
            (it["index"], it["batch_label"], it["indices"].tobytes(), it["data"].tobytes())
            for mb in ds
            for it in mb
        ]

    ref = items(kang_stim_path)
    assert len(ref) == kang.n_obs
    assert items(zarr_path) == ref
    assert items(AnnDataSource(kang)) == ref


@pytest.mark.e2e
def test_integrate_streams_a_zarr_store_like_the_h5ad(kang_stim_path: Path, zarr_path) -> None:
    """The one workflow over a StoreSource: .zarr and .h5ad give the same run."""
    from celltune.tasks.integration import EMBEDDING_KEY, integrate_file

    cfg = {
        "data": {"batch_key": "batch", "max_cells": 200, "n_hvg": 50, "chunk_size": 64},
        "model": {"d_model": 16, "d_hid": 16, "nlayers": 1},
        "train": {"epochs": 1, "batch_size": 32, "quiet": True},
    }
    a = integrate_file(kang_stim_path, cfg)
    b = integrate_file(zarr_path, cfg)
    assert list(a.adata.obs_names) == list(b.adata.obs_names)
    assert list(a.adata.var_names[a.adata.var["celltune_hvg"]]) == list(
        b.adata.var_names[b.adata.var["celltune_hvg"]]
    )
    np.testing.assert_allclose(a.adata.obsm[EMBEDDING_KEY], b.adata.obsm[EMBEDDING_KEY], atol=1e-5)
