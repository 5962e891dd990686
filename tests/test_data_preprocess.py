"""The SPEC §1 pipeline on real Kang PBMC counts: result layout, values, and bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from celltune.data.binning import bin_matrix, cell_keys
from celltune.data.preprocess import PreprocessConfig, preprocess
from celltune.errors import InputError

N_HVG = 500


@pytest.fixture(scope="module")
def stim(kang_stim_path):
    return ad.read_h5ad(kang_stim_path)


@pytest.fixture(scope="module")
def result(stim):
    return preprocess(stim, n_hvg=N_HVG, batch_key="batch")


def test_layout(result, stim):
    assert result.shape == (stim.n_obs, N_HVG)
    assert set(result.layers.keys()) == {"counts", "X_normed", "X_binned"}
    for name in ("counts", "X_normed", "X_binned"):
        assert sp.isspmatrix_csr(result.layers[name]), name
    assert result.var["highly_variable"].all()
    assert (result.layers["X_normed"] != result.X).nnz == 0
    params = result.uns["celltune"]["preprocess"]
    assert params["n_hvg"] == N_HVG and params["batch_key"] == "batch"
    assert params["hvg_flavor_used"] == "seurat_v3" and params["n_bins"] == 51
    assert params["n_cells_in"] == 1556 and params["n_genes_in"] == 1267
    assert list(result.obs_names) == list(stim.obs_names)
    assert "X_binned" not in stim.layers and stim.shape == (1556, 1267)  # input untouched


def test_values_follow_the_spec(result, stim):
    import scanpy as sc

    raw = stim[:, result.var_names].X
    # counts layer: the untouched raw counts of the kept genes
    assert (result.layers["counts"] != raw).nnz == 0
    # normalised on the library size over ALL genes, then log1p
    lib = np.asarray(stim.X.sum(axis=1)).ravel()
    expect = np.log1p(sp.diags(1e4 / lib) @ raw.astype(np.float64))
    np.testing.assert_allclose(result.X.toarray(), expect.toarray(), rtol=1e-5, atol=1e-6)
    # HVGs = scanpy's seurat_v3 on the counts with the batch key
    ref = stim.copy()
    ref.layers["counts"] = ref.X.copy()
    sc.pp.highly_variable_genes(
        ref, n_top_genes=N_HVG, flavor="seurat_v3", layer="counts", batch_key="batch"
    )
    assert set(result.var_names) == set(ref.var_names[ref.var["highly_variable"]])
    # bins: per cell on the HVG values, same as binning the raw counts of those genes
    keys = cell_keys(result.obs_names)
    assert (result.layers["X_binned"] != bin_matrix(raw, 51, seed=0, keys=keys)).nnz == 0


def test_saved_and_reloaded(result, tmp_path):
    from celltune.data.io import read_h5ad, write_h5ad

    write_h5ad(result, tmp_path / "pp.h5ad")
    back = read_h5ad(tmp_path / "pp.h5ad")
    assert back.uns["celltune"]["preprocess"]["n_hvg"] == N_HVG
    assert (back.layers["X_binned"] != result.layers["X_binned"]).nnz == 0


def test_no_batch_key_and_cell_ranger(stim):
    sub = stim[::4].copy()
    r = preprocess(sub, n_hvg=200, hvg_flavor="cell_ranger", n_bins=11, seed=5)
    assert r.shape == (sub.n_obs, 200)
    assert r.layers["X_binned"].data.max() <= 10
    assert r.uns["celltune"]["preprocess"]["hvg_flavor_used"] == "cell_ranger"


def test_keep_all_genes(stim):
    r = preprocess(stim[::4].copy(), n_hvg=0, filter_gene_by_counts=None)
    assert r.shape[1] == stim.n_vars
    assert r.uns["celltune"]["preprocess"]["hvg_flavor_used"] == "none"


def test_layer_and_filters(stim):
    sub = stim[::4].copy()
    sub.layers["raw"] = sub.X.copy()
    sub.X = sp.csr_matrix(sub.X.shape, dtype=np.float32)  # X is empty; counts in a layer
    r = preprocess(sub, layer="raw", n_hvg=100, filter_gene_by_counts=50, filter_cell_by_counts=600)
    totals = np.asarray(sub.layers["raw"].sum(axis=0)).ravel()
    assert r.uns["celltune"]["preprocess"]["n_genes_after_filter"] == int((totals >= 50).sum())
    cells = np.asarray(sub.layers["raw"][:, totals >= 50].sum(axis=1)).ravel() >= 600
    assert r.n_obs == int(cells.sum()) < sub.n_obs


def test_dense_input_same_result(stim):
    sub = stim[::8].copy()
    a = preprocess(sub, n_hvg=100)
    sub.X = sub.X.toarray()
    b = preprocess(sub, n_hvg=100)
    assert list(a.var_names) == list(b.var_names)
    assert sp.isspmatrix_csr(b.layers["X_binned"])
    assert (a.layers["X_binned"] != b.layers["X_binned"]).nnz == 0


def test_already_log_transformed_data(adamson_mini_path):
    gears = ad.read_h5ad(adamson_mini_path)  # GEARS: normalised + log1p
    with pytest.raises(InputError, match=r"log-transformed.*--not-raw.*data_is_raw=False"):
        preprocess(gears, n_hvg=50)
    r = preprocess(gears, n_hvg=50, data_is_raw=False)
    assert "counts" not in r.layers
    assert r.uns["celltune"]["preprocess"]["hvg_flavor_used"] == "cell_ranger"
    np.testing.assert_array_equal(  # not normalised or log-transformed again
        r.X.toarray(), gears[:, r.var_names].X.toarray()
    )


def test_log_normalised_small_libraries_still_refused(stim):
    """Kang cells have < 5,800 counts: SPEC's detector misses log1p data, preprocess does not."""
    import scanpy as sc

    norm = stim[::4].copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    with pytest.raises(InputError, match="log-transformed"):
        preprocess(norm, n_hvg=50)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.nan, "NaN"),
        (-3.0, "negative"),
        (1.5, "non-integer.*--not-raw"),
    ],
)
def test_bad_values(stim, value, match):
    bad = stim[:200].copy()
    bad.X.data[11] = value
    with pytest.raises(InputError, match=match):
        preprocess(bad, n_hvg=50)


def test_too_few_genes_for_n_hvg(stim):
    with pytest.raises(InputError, match=r"n_hvg=5,000 but only 1,267 genes.*--n-hvg 1267"):
        preprocess(stim, n_hvg=5000)


def test_missing_batch_key_lists_columns(stim):
    with pytest.raises(InputError, match=r"'donor_id'.*'batch', 'sample_id'"):
        preprocess(stim, batch_key="donor_id")


@pytest.mark.parametrize("n_small", [1, 3])
def test_tiny_batches(stim, n_small):
    """A 1-cell batch would crash scikit-misc's loess (free(): invalid pointer)."""
    sub = stim[:300].copy()
    sub.obs["plate"] = ["p1"] * (300 - n_small) + ["p2"] * n_small
    match = r"'p2' \(1 cell\).*omit --batch-key" if n_small == 1 else "a batch may have too few"
    with pytest.raises(InputError, match=match):
        preprocess(sub, n_hvg=100, batch_key="plate")


def test_empty_dataset(stim):
    with pytest.raises(InputError, match="empty"):
        preprocess(stim[:0].copy())
    with pytest.raises(InputError, match=r"at least 2 cells \(got 1\)"):  # loess would crash
        preprocess(stim[:1].copy(), n_hvg=10)
    assert preprocess(stim[:1].copy(), n_hvg=0).shape[0] == 1
    with pytest.raises(InputError, match="no data left after filtering"):
        preprocess(stim[:5].copy(), filter_gene_by_counts=10**9)


def test_bad_options(stim):
    with pytest.raises(InputError, match=r"unknown preprocess option.*n_hvgs"):
        preprocess(stim, n_hvgs=10)
    with pytest.raises(InputError, match="hvg_flavor"):
        preprocess(stim, hvg_flavor="best")
    with pytest.raises(InputError, match="n_bins"):
        PreprocessConfig(n_bins=1).validate()
