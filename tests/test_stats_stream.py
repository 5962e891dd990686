"""``celltune stats --stream``: figures from a file read in chunks equal the in-memory ones."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from celltune.analysis import perturbation_stats as ps
from celltune.cli.main import app
from celltune.data.source import StoreSource


@pytest.fixture(scope="module")
def papalexi_file(papalexi_path, tmp_path_factory):
    """2,500 real Papalexi cells (raw counts), 80 genes, written as a CSR .h5ad."""
    full = ad.read_h5ad(papalexi_path)
    keep = np.sort(np.random.default_rng(1).choice(full.n_obs, 2500, replace=False))
    sub = full[keep, :80].copy()
    path = tmp_path_factory.mktemp("stats") / "papalexi.h5ad"
    sub.write_h5ad(path)
    return sub, path


def _equal(a: ps.PerturbationStats, b: ps.PerturbationStats, de: bool = True) -> None:
    pd.testing.assert_frame_equal(a.per_gene, b.per_gene, check_exact=True)
    pd.testing.assert_frame_equal(a.ctrl_counts_mean_var, b.ctrl_counts_mean_var, check_exact=True)
    if de:
        pd.testing.assert_frame_equal(a.per_perturbation, b.per_perturbation, check_exact=True)
        pd.testing.assert_frame_equal(a.top_de, b.top_de, check_exact=True)
    sa, sb = dict(a.summary), dict(b.summary)
    for s in (sa, sb):
        s.pop("de_cells")
        s.pop("parameters")
        if not de:
            s.pop("significant_genes")
            s.pop("top_de_effect_over_ctrl_sd", None)
            s.pop("top_de_frac_effect_gt_ctrl_sd", None)
    assert json.dumps(sa, sort_keys=True, default=str) == json.dumps(
        sb, sort_keys=True, default=str
    )


@pytest.mark.parametrize("chunk_rows", [20000, 333])
def test_streamed_stats_equal_in_memory_papalexi(papalexi_file, chunk_rows) -> None:
    """Moments exactly equal; DE (per group vs control, no cap) equal to the joint call."""
    adata, path = papalexi_file
    mem = ps.compute_perturbation_stats(
        adata, condition_key="perturbation", control="control", chunk_rows=chunk_rows
    )
    with StoreSource(path) as src:
        st = ps.compute_perturbation_stats(
            src, condition_key="perturbation", control="control", chunk_rows=chunk_rows
        )
    assert st.summary["parameters"]["streamed"] and not mem.summary["parameters"]["streamed"]
    assert mem.summary["de_cells"]["mode"] == "all cells, one call"
    assert st.summary["de_cells"]["mode"] == "per perturbation vs control"
    assert st.summary["de_cells"]["subsampled_groups"] == {}
    _equal(mem, st)


def test_chunk_size_changes_sums_by_rounding_only(papalexi_file) -> None:
    adata, _ = papalexi_file
    kw = {"condition_key": "perturbation", "control": "control", "methods": ["t-test"]}
    a = ps.compute_perturbation_stats(adata, **kw)
    b = ps.compute_perturbation_stats(adata, chunk_rows=97, **kw)
    num = a.per_gene.select_dtypes("number").columns
    np.testing.assert_allclose(a.per_gene[num], b.per_gene[num], rtol=1e-9, atol=1e-12)


def test_streamed_stats_equal_in_memory_adamson(adamson_mini_path) -> None:
    """Log-normalised GEARS input (used as is, no normalisation)."""
    adata = ad.read_h5ad(adamson_mini_path)
    mem = ps.compute_perturbation_stats(adata, methods=["t-test"], chunk_rows=50)
    with StoreSource(adamson_mini_path) as src:
        st = ps.compute_perturbation_stats(src, methods=["t-test"], chunk_rows=50)
    assert st.summary["input_assumed"] == ps.LOG
    _equal(mem, st)


def test_de_subsample_is_bounded_seeded_and_same_in_memory(papalexi_file) -> None:
    adata, path = papalexi_file
    kw = {"condition_key": "perturbation", "control": "control", "methods": ["t-test"]}
    mem = ps.compute_perturbation_stats(adata, de_max_cells=40, **kw)
    with StoreSource(path) as src:
        st = ps.compute_perturbation_stats(src, de_max_cells=40, **kw)
    _equal(mem, st)
    sub = st.summary["de_cells"]["subsampled_groups"]
    assert sub["control"] == 40 and all(v == 40 for v in sub.values())
    full = ps.compute_perturbation_stats(adata, **kw)
    # moments never subsampled
    pd.testing.assert_frame_equal(
        full.per_gene.drop(columns="n_perturbations_significant_t-test"),
        st.per_gene.drop(columns="n_perturbations_significant_t-test"),
        check_exact=True,
    )


def test_cli_stats_stream(tmp_path, papalexi_file) -> None:
    _, path = papalexi_file
    out = tmp_path / "s"
    args = ["stats", str(path), "--condition-key", "perturbation", "--control", "control"]
    args += ["--methods", "t-test", "--out", str(out)]
    res = CliRunner().invoke(
        app, [*args, "--stream", "--de-max-cells", "60", "--chunk-rows", "500"]
    )
    assert res.exit_code == 0, res.output
    assert "seeded subsample of at most 60 cells" in res.output
    s = json.loads((out / "stats.json").read_text())
    assert s["de_cells"]["max_cells_per_group"] == 60
    assert s["parameters"]["streamed"] is True
    res = CliRunner().invoke(app, ["stats", "--help"])
    assert "--stream" in res.output and "--de-max-cells" in res.output
