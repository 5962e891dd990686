"""scIB metrics table, PCA/Harmony/scVI baselines and UMAP plots on real Kang 2018 cells."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

from celltune.errors import InputError
from celltune.eval.baselines import harmony_embedding, pca_embedding, scvi_embedding
from celltune.eval.integration import (
    METRIC_COLUMNS,
    aggregate_scores,
    label_mask,
    scib_metrics_table,
)
from celltune.report.integration_plots import plot_metrics, plot_umaps


def _preprocessed(path: Path, n_cells: int, seed: int = 0) -> ad.AnnData:
    """The preprocess() convention: counts / X_normed layers and highly_variable genes."""
    a = ad.read_h5ad(path)
    idx = np.sort(np.random.default_rng(seed).choice(a.n_obs, n_cells, replace=False))
    a = a[idx].copy()
    a.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.layers["X_normed"] = a.X.copy()
    sc.pp.highly_variable_genes(a, n_top_genes=500, flavor="seurat_v3", layer="counts")
    return a


@pytest.fixture(scope="module")
def kang(kang_stim_path: Path) -> ad.AnnData:
    a = _preprocessed(kang_stim_path, 400)
    pca_embedding(a, n_comps=20)
    harmony_embedding(a, "batch")
    return a


def test_baselines_shapes_and_seeding(kang: ad.AnnData) -> None:
    assert kang.obsm["X_pca"].shape == (400, 20)
    assert kang.obsm["X_harmony"].shape == (400, 20)
    assert np.isfinite(kang.obsm["X_harmony"]).all()
    assert not np.allclose(kang.obsm["X_pca"], kang.obsm["X_harmony"])
    again = kang.copy()
    np.testing.assert_allclose(pca_embedding(again, n_comps=20), kang.obsm["X_pca"], atol=1e-4)
    np.testing.assert_allclose(harmony_embedding(again, "batch"), kang.obsm["X_harmony"], atol=1e-4)


def test_scib_table_finite_in_range_and_harmony_mixes_better(kang: ad.AnnData) -> None:
    table = scib_metrics_table(
        kang, {"pca": "X_pca", "harmony": "X_harmony"}, "batch", "cell_type", quiet=True
    )
    assert list(table.index) == ["pca", "harmony"]
    vals = table[list(METRIC_COLUMNS)].to_numpy(dtype=float)
    assert np.isfinite(vals).all()
    assert (vals >= 0).all() and (vals <= 1).all()
    for _, row in table.iterrows():
        assert row["avg_bio"] == pytest.approx(
            np.mean([row["nmi"], row["ari"], row["asw_celltype"]])
        )
        assert row["avg_batch"] == pytest.approx(
            np.mean([row["asw_batch"], row["graph_connectivity"]])
        )
    # ctrl vs IFN-b stimulation is a strong "batch": Harmony must mix it better than PCA.
    assert table.loc["harmony", "ilisi"] > table.loc["pca", "ilisi"]


def test_unknown_labels_are_excluded(kang: ad.AnnData) -> None:
    a = kang.copy()
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    a.obs.loc[a.obs_names[:50], "cell_type"] = "unknown"
    assert label_mask(a.obs["cell_type"]).sum() == 350
    table = scib_metrics_table(
        a, {"pca": "X_pca"}, "batch", "cell_type", max_cells=300, clustering="kmeans", quiet=True
    )
    assert table.loc["pca", "n_cells"] == 300
    assert table.loc["pca", "n_labelled"] < 300


def test_aggregates_known_values() -> None:
    m = {
        "nmi": 0.6,
        "ari": 0.3,
        "asw_celltype": 0.9,
        "isolated_label": 0.5,
        "clisi": 1.0,
        "asw_batch": 0.8,
        "ilisi": 0.2,
        "kbet": 0.4,
        "graph_connectivity": 1.0,
    }
    agg = aggregate_scores(m)
    assert agg["avg_bio"] == pytest.approx(0.6)
    assert agg["avg_batch"] == pytest.approx(0.9)
    assert agg["scib_bio"] == pytest.approx(0.66)
    assert agg["scib_batch"] == pytest.approx(0.6)
    assert agg["scib_total"] == pytest.approx(0.6 * 0.66 + 0.4 * 0.6)


def test_bad_input(kang: ad.AnnData) -> None:
    with pytest.raises(InputError, match=r"not in adata\.obs "):
        scib_metrics_table(kang, {"pca": "X_pca"}, "nope", "cell_type")
    with pytest.raises(InputError, match=r"not in adata\.obsm"):
        scib_metrics_table(kang, {"x": "X_missing"}, "batch", "cell_type")
    one = kang.copy()
    one.obs["one"] = "b0"
    with pytest.raises(InputError, match="at least 2"):
        scib_metrics_table(one, {"pca": "X_pca"}, "one", "cell_type")
    with pytest.raises(InputError, match="single batch"):
        harmony_embedding(one, "one")
    with pytest.raises(InputError, match="layer"):
        pca_embedding(kang, layer="nope")


def test_scvi_too_slow_is_skipped_with_a_reason(kang: ad.AnnData) -> None:
    emb, reason = scvi_embedding(
        kang.copy(), "batch", max_epochs=10, max_cell_epochs=100, accelerator="cpu"
    )
    assert emb is None
    assert "max_cell_epochs" in reason or "not installed" in reason


def test_plots_written(kang: ad.AnnData, tmp_path: Path) -> None:
    paths = plot_umaps(
        kang,
        {"pca": "X_pca", "harmony": "X_harmony"},
        tmp_path,
        batch_key="batch",
        label_key="cell_type",
    )
    table = scib_metrics_table(
        kang, {"pca": "X_pca"}, "batch", "cell_type", clustering="kmeans", quiet=True
    )
    paths["metrics"] = plot_metrics(table, tmp_path / "metrics.png")
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.e2e
def test_umaps_of_more_than_8192_cells(kang_donors_path: Path, tmp_path: Path) -> None:
    """From 8,192 cells scanpy 1.11 switched to a neighbour path that breaks on SciPy
    1.17 (csr_array.getnnz); the 12k-cell real run got no plots. UMAPs must still come."""
    from celltune.report.integration_plots import compute_umaps

    big = _preprocessed(kang_donors_path, 8300)
    pca_embedding(big, n_comps=20)
    idx, coords = compute_umaps(big, {"pca": "X_pca"}, seed=0)
    assert idx.size == 8300 and coords["pca"].shape == (8300, 2)
    assert np.isfinite(coords["pca"]).all() and coords["pca"].std(axis=0).min() > 0.1
    paths = plot_umaps(big, {"pca": "X_pca"}, tmp_path, batch_key="batch", label_key="cell_type")
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths.values())
