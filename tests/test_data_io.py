"""h5ad I/O and input checks: clear errors for every bad-input case of issue 2."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from celltune.data import io
from celltune.errors import InputError


@pytest.fixture(scope="module")
def stim(kang_stim_path):
    return io.read_h5ad(kang_stim_path)


def test_read_real_file(stim):
    assert stim.shape == (1556, 1267)
    assert sp.isspmatrix_csr(stim.X)


def test_read_backed(kang_stim_path):
    a = io.read_h5ad(kang_stim_path, backed=True)
    try:
        assert a.isbacked and a.shape == (1556, 1267)
    finally:
        a.file.close()


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        io.read_h5ad(tmp_path / "nope.h5ad")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(InputError, match="directory"):
        io.read_h5ad(tmp_path)


def test_not_an_h5ad(tmp_path):
    p = tmp_path / "counts.h5ad"
    p.write_text("gene,cell1\nCD3D,4\n")
    with pytest.raises(InputError, match=r"not an \.h5ad .*convert"):
        io.read_h5ad(p)


def test_truncated_h5ad(tmp_path, kang_stim_path):
    p = tmp_path / "cut.h5ad"
    p.write_bytes(kang_stim_path.read_bytes()[:5000])
    with pytest.raises(InputError, match="could not be read as AnnData"):
        io.read_h5ad(p)


def test_write_is_atomic(tmp_path, stim):
    out = tmp_path / "out.h5ad"
    small = stim[:20, :10].copy()
    io.write_h5ad(small, out)
    back = ad.read_h5ad(out)
    assert back.shape == (20, 10)
    assert list(tmp_path.iterdir()) == [out]  # no temp files left

    bad = small.copy()
    bad.uns["unwritable"] = object()  # anndata fails after it has started the file
    before = out.read_bytes()
    with pytest.raises(Exception, match="object"):
        io.write_h5ad(bad, out)
    assert out.read_bytes() == before  # the old file is untouched
    assert list(tmp_path.iterdir()) == [out]


def test_get_matrix_lists_layers(stim):
    a = stim[:5].copy()
    a.layers["counts"] = a.X.copy()
    assert io.get_matrix(a) is a.X
    assert io.get_matrix(a, "counts") is a.layers["counts"]
    with pytest.raises(InputError, match=r"'raw_counts' not found; available layers: 'counts'"):
        io.get_matrix(a, "raw_counts")


def test_require_obs_column_lists_columns(stim):
    assert io.require_obs_column(stim, "batch", "integration").nunique() == 2
    with pytest.raises(InputError) as err:
        io.require_obs_column(stim, "donor_id", "batch correction (--batch-key)")
    msg = str(err.value)
    assert "'donor_id'" in msg and "--batch-key" in msg
    for col in stim.obs.columns:
        assert repr(col) in msg


def test_require_obs_column_missing_values(stim):
    a = stim[:10].copy()
    a.obs["b"] = ["x"] * 9 + [None]
    with pytest.raises(InputError, match="1 missing values"):
        io.require_obs_column(a, "b", "batch labels")


def test_raw_counts_accepted(stim):
    io.check_raw_counts(stim.X)
    io.check_raw_counts(stim.X[:50].toarray())


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.nan, "NaN"),
        (np.inf, "infinite"),
        (-1.0, "negative"),
        (2.5, "non-integer.*--not-raw.*data_is_raw=False"),
    ],
)
def test_raw_counts_rejected(stim, value, match):
    X = stim.X[:30].copy()
    X.data[7] = value
    with pytest.raises(InputError, match=match):
        io.check_raw_counts(X, "X")
    with pytest.raises(InputError, match=match):
        io.check_raw_counts(X.toarray(), "X")


def test_log_detector_on_real_data(stim, kang_harmony_path, adamson_mini_path):
    import scanpy as sc

    assert not io.looks_log_transformed(stim.X)  # raw counts, max 1,891
    norm = stim.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    assert not io.looks_log_transformed(norm.X)  # normalised but not log: max > 30
    wide = ad.read_h5ad(kang_harmony_path)
    assert not io.looks_log_transformed(wide.X)
    sc.pp.normalize_total(wide, target_sum=1e4)
    sc.pp.log1p(wide)
    assert io.looks_log_transformed(wide.X)
    assert io.looks_log_transformed(wide.X.toarray())
    assert io.looks_log_transformed(ad.read_h5ad(adamson_mini_path).X)  # GEARS log1p data


def test_log_detector_spec_rule_misses_small_libraries(stim):
    """SPEC's rule needs a value < 1; with < 5,800 counts per cell log1p(1e4/n) >= 1.

    Every cell of this gene-subset file has fewer counts, so the rule alone says False;
    preprocess therefore also refuses non-integer data with max <= 30 (test_data_preprocess).
    """
    import scanpy as sc

    norm = stim.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    assert norm.X.data.min() >= 1
    assert not io.looks_log_transformed(norm.X)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 3.0], True),
        ([0.0, 0.5, 30.0], True),  # max <= 30 is inclusive
        ([0.0, 0.5, 30.5], False),  # max > 30
        ([0.0, 1.0, 3.0], False),  # smallest non-zero must be < 1
        ([-0.1, 0.5, 3.0], False),  # negative (scaled data)
        ([0.0, 0.0, 0.0], False),  # nothing to judge
    ],
)
def test_log_detector_thresholds(values, expected):
    X = np.array([values], dtype=np.float32)
    assert io.looks_log_transformed(X) is expected
    assert io.looks_log_transformed(sp.csr_matrix(X)) is expected


def test_write_h5ad_compresses_by_default_and_streams_back(tmp_path):
    import h5py
    import pandas as pd

    from celltune.data.source import open_source

    rng = np.random.default_rng(0)
    X = sp.random(400, 60, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    a = ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(400)]))
    io.write_h5ad(a, tmp_path / "gz.h5ad")
    io.write_h5ad(a, tmp_path / "raw.h5ad", compression=None)
    with h5py.File(tmp_path / "gz.h5ad") as f:
        assert f["X/data"].compression == "gzip"
    with h5py.File(tmp_path / "raw.h5ad") as f:
        assert f["X/data"].compression is None
    rows = open_source(tmp_path / "gz.h5ad").read_rows(100, 150)  # --stream reads it too
    assert abs(rows - X[100:150]).max() == 0
