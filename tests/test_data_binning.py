"""Per-cell value binning (SPEC §1 step 6) on the real Kang PBMC counts."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from celltune.data.binning import bin_matrix, cell_keys, quantile_edges
from celltune.errors import InputError

N_BINS = 51


@pytest.fixture(scope="module")
def kang(kang_donors_path):
    """600 real cells (every 20th) of the 12k-cell Kang donors file, raw counts, CSR."""
    a = ad.read_h5ad(kang_donors_path)
    a = a[::20].copy()
    assert sp.isspmatrix_csr(a.X)
    return a


@pytest.fixture(scope="module")
def binned(kang):
    return bin_matrix(kang.X, N_BINS, seed=0, keys=cell_keys(kang.obs_names))


def test_cell_keys_stable_and_63_bit():
    k = cell_keys(["AAAC-1", "AAAC-2", "AAAC-1"])
    assert k.dtype == np.int64
    assert k[0] == k[2] != k[1]
    assert (k >= 0).all()
    # a fixed value: the key must not change between processes or releases (blake2b)
    import hashlib

    expect = int.from_bytes(hashlib.blake2b(b"AAAC-1", digest_size=8).digest(), "little")
    assert k[0] == expect & 0x7FFF_FFFF_FFFF_FFFF


def test_quantile_edges_match_numpy(kang):
    for i in range(0, kang.n_obs, 7):
        row = kang.X[i].data
        for nb in (2, 11, 51):
            np.testing.assert_array_equal(
                quantile_edges(row, nb),
                np.quantile(row.astype(np.float64), np.linspace(0, 1, nb - 1)),
            )


def test_zeros_stay_zero_and_nonzeros_in_range(kang, binned):
    assert sp.isspmatrix_csr(binned)
    assert binned.dtype == np.float32
    # same sparsity pattern: zeros stay bin 0, every non-zero gets a bin >= 1
    assert (binned != 0).sum() == kang.X.nnz
    assert ((binned != 0) != (kang.X != 0)).nnz == 0
    assert binned.data.min() >= 1 and binned.data.max() <= N_BINS - 1
    assert np.array_equal(binned.data, np.round(binned.data))


def test_bin_order_follows_value_order(kang, binned):
    for i in range(kang.n_obs):
        v = kang.X[i].toarray().ravel()
        b = binned[i].toarray().ravel()
        nz = v > 0
        order = np.argsort(v[nz], kind="stable")
        vs, bs = v[nz][order], b[nz][order]
        strictly_larger = np.diff(vs) > 0
        # a strictly larger value never gets a smaller bin
        assert (np.diff(bs)[strictly_larger] >= 0).all()
        # the largest value of the cell lands in the top bin, the smallest near the bottom
        assert bs[-1] == N_BINS - 1 or vs[-1] == vs[0]


def test_non_tied_values_use_numpy_digitize(kang, binned):
    """Known answer: a value on no edge gets np.digitize's bin; one on edges a bin within them."""
    for i in range(0, kang.n_obs, 5):
        row = kang.X[i]
        v = row.data.astype(np.float64)
        b = binned[i].data
        edges = np.quantile(v, np.linspace(0, 1, N_BINS - 1))
        left = np.digitize(v, edges)
        right = np.digitize(v, edges, right=True)
        on_edge = left != right
        assert np.array_equal(b[~on_edge], left[~on_edge])
        assert ((b[on_edge] >= right[on_edge] + 1) & (b[on_edge] <= left[on_edge])).all()


def test_independent_of_library_size(kang, binned):
    """Bins depend only on each cell's value ranks: normalising/log1p/scaling changes nothing."""
    import scanpy as sc

    keys = cell_keys(kang.obs_names)
    norm = kang.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    b_norm = bin_matrix(norm.X, N_BINS, seed=0, keys=keys)
    assert (b_norm != binned).nnz == 0
    scaled = sp.diags(np.linspace(0.3, 17.0, kang.n_obs)) @ kang.X
    b_scaled = bin_matrix(sp.csr_matrix(scaled), N_BINS, seed=0, keys=keys)
    assert (b_scaled != binned).nnz == 0


def test_ties_are_spread(kang, binned):
    """Counts of 1 are tied and span many edges: their bins spread ~uniformly over the span."""
    spans = []
    for i in range(kang.n_obs):
        v = kang.X[i].data.astype(np.float64)
        b = binned[i].data
        ones = v == 1
        edges = np.quantile(v, np.linspace(0, 1, N_BINS - 1))
        left = np.digitize(1.0, edges)
        if ones.sum() >= 40 and left >= 5:
            spans.append((b[ones], left))
    assert len(spans) > 50
    for bins_of_ones, _left in spans[:50]:
        assert len(np.unique(bins_of_ones)) > 1  # not all in one bin (scGPT "side=one")
    # pooled over cells, each bin of the span is hit equally often (relative position)
    rel = np.concatenate([(b - 1) / left for b, left in spans])
    hist, _ = np.histogram(rel, bins=5, range=(0, 1))
    assert hist.min() > 0.8 * hist.mean()


def test_same_cell_same_bins_whatever_chunk_or_order(kang, binned):
    keys = cell_keys(kang.obs_names)
    perm = np.random.default_rng(3).permutation(kang.n_obs)[:200]
    b_sub = bin_matrix(kang.X[perm], N_BINS, seed=0, keys=keys[perm])
    assert (b_sub != binned[perm]).nnz == 0
    # another seed gives other tie draws
    b_other = bin_matrix(kang.X, N_BINS, seed=1, keys=keys)
    assert (b_other != binned).nnz > 0


def test_dense_input_gives_same_bins(kang, binned):
    keys = cell_keys(kang.obs_names)
    dense = bin_matrix(kang.X[:50].toarray(), N_BINS, seed=0, keys=keys[:50])
    assert isinstance(dense, np.ndarray) and dense.dtype == np.float32
    np.testing.assert_array_equal(dense, binned[:50].toarray())


def test_sparse_never_densified():
    """3,000 cells x 10 million genes: a dense copy would need 120 GB."""
    rng = np.random.default_rng(0)
    n, g, k = 3_000, 10_000_000, 20
    indices = np.sort(rng.choice(g, size=(n, k), replace=True), axis=1).ravel()
    data = rng.integers(1, 50, size=n * k).astype(np.float32)
    X = sp.csr_matrix((data, indices, np.arange(0, n * k + 1, k)), shape=(n, g))
    X.sum_duplicates()
    out = bin_matrix(X, N_BINS)
    assert sp.isspmatrix_csr(out) and out.shape == (n, g) and out.nnz == X.nnz


def test_all_zero_cells_stay_zero_with_warning(kang):
    X = kang.X[:10].tolil()
    X[3, :] = 0
    X[7, :] = 0
    X = X.tocsr()
    with pytest.warns(UserWarning, match="2 of 10 cells are all zero"):
        out = bin_matrix(X, N_BINS, keys=cell_keys(kang.obs_names[:10]))
    assert out[3].nnz == 0 and out[7].nnz == 0
    assert out[0].nnz == X[0].nnz


def test_no_warning_without_empty_cells(kang):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bin_matrix(kang.X[:20], N_BINS)


@pytest.mark.parametrize(
    ("values", "match"),
    [([[1.0, -2.0]], "negative"), ([[1.0, np.nan]], "NaN")],
)
def test_bad_values_rejected(values, match):
    with pytest.raises(InputError, match=match):
        bin_matrix(sp.csr_matrix(np.array(values)), N_BINS)


def test_bad_n_bins_and_keys_rejected(kang):
    with pytest.raises(InputError, match="n_bins"):
        bin_matrix(kang.X[:5], 1)
    with pytest.raises(InputError, match="one key per cell"):
        bin_matrix(kang.X[:5], N_BINS, keys=np.arange(4))


@pytest.mark.parametrize("n_bins", [2, 3, 11, 51])
def test_vectorised_path_equals_per_row_reference(kang, n_bins):
    from celltune.data.binning import _bin_rows_loop, _bin_rows_vectorised

    X, keys = kang.X, cell_keys(kang.obs_names)
    fast, e1 = _bin_rows_vectorised(X.data, X.indptr, keys, n_bins, 7)
    slow, e2 = _bin_rows_loop(X.data, X.indptr, keys, n_bins, 7)
    np.testing.assert_array_equal(fast, slow)
    assert e1 == e2 == 0


def test_float64_and_explicit_zeros(kang, binned):
    keys = cell_keys(kang.obs_names)
    X64 = kang.X.astype(np.float64)  # float32-exact: same bins
    assert (bin_matrix(X64, N_BINS, keys=keys) != binned).nnz == 0
    odd = kang.X.astype(np.float64) * (1 + 1e-12)  # not float32-exact: per-row path
    assert (bin_matrix(odd, N_BINS, keys=keys) != binned).nnz == 0
    Z = kang.X[:20].copy()
    Z.data[::3] = 0  # explicit zeros stored in the CSR stay bin 0
    out = bin_matrix(Z, N_BINS, keys=keys[:20])
    Z.eliminate_zeros()
    assert (out != bin_matrix(Z, N_BINS, keys=keys[:20])).nnz == 0
