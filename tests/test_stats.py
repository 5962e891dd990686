"""Perturbation statistics: figures vs direct computations, real-data consistency, CLI."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats as sst
from typer.testing import CliRunner

from celltune.analysis import perturbation_stats as ps
from celltune.cli.main import app
from celltune.errors import InputError


def _known() -> ad.AnnData:
    """Raw counts: 40 ctrl, 40 'G0+ctrl' (G0 knocked down, G1 up), 30 'ABSENT+ctrl'.

    G2..G5 are drawn from one distribution for everyone (no effect); G6 is zero in every
    control cell but expressed in some perturbed cells.
    """
    rng = np.random.default_rng(7)
    n = {"ctrl": 40, "G0+ctrl": 40, "ABSENT+ctrl": 30}
    blocks = []
    for cond, k in n.items():
        g0 = rng.poisson(0.3 if cond == "G0+ctrl" else 20, k)
        g1 = rng.poisson(25 if cond == "G0+ctrl" else 5, k)  # library size kept
        rest = rng.poisson(6, (k, 4))
        g6 = np.zeros(k) if cond == "ctrl" else (rng.random(k) < 0.2).astype(float)
        blocks.append(np.column_stack([g0, g1, rest, g6]))
    X = np.vstack(blocks).astype(np.float32)
    obs = pd.DataFrame(
        {"condition": np.repeat(list(n), list(n.values()))},
        index=[f"c{i}" for i in range(len(X))],
    )
    return ad.AnnData(
        X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(7)])
    )


def _bh(p: np.ndarray) -> np.ndarray:
    order = np.argsort(p)
    r = p[order] * len(p) / np.arange(1, len(p) + 1)
    r = np.minimum.accumulate(r[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(r, 1)
    return out


@pytest.fixture(scope="module")
def known_result() -> tuple[ad.AnnData, ps.PerturbationStats]:
    adata = _known()
    return adata, ps.compute_perturbation_stats(adata)


def test_zero_fractions_match_direct_count(known_result) -> None:
    adata, res = known_result
    X = adata.X.toarray()
    ctrl = (adata.obs["condition"] == "ctrl").to_numpy()
    s = res.summary
    assert s["input_assumed"] == ps.RAW
    assert s["zero_fraction"]["control"] == pytest.approx((X[ctrl] == 0).mean())
    assert s["zero_fraction"]["perturbed"] == pytest.approx((X[~ctrl] == 0).mean())
    assert s["n_genes_zero_in_all_control_cells"] == int(((X[ctrl] != 0).sum(0) == 0).sum()) == 1
    g = res.per_gene.set_index("gene")
    np.testing.assert_allclose(g["zero_fraction_ctrl"], (X[ctrl] == 0).mean(0))
    np.testing.assert_allclose(g["zero_fraction_perturbed"], (X[~ctrl] == 0).mean(0))
    p = res.per_perturbation.set_index("perturbation")
    sel = (adata.obs["condition"] == "G0+ctrl").to_numpy()
    assert p.loc["G0+ctrl", "zero_fraction"] == pytest.approx((X[sel] == 0).mean())
    assert p.loc["G0+ctrl", "n_cells"] == 40


def test_ttest_counts_match_scipy_welch_with_bh(known_result) -> None:
    adata, res = known_result
    X = adata.X.toarray()
    tot = X.sum(1)
    L = np.log1p(X * (np.median(tot) / tot)[:, None])
    cond = adata.obs["condition"].to_numpy()
    p = res.per_perturbation.set_index("perturbation")
    for pert in ("G0+ctrl", "ABSENT+ctrl"):
        pv = sst.ttest_ind(L[cond == pert], L[cond == "ctrl"], equal_var=False).pvalue
        pv = np.nan_to_num(pv, nan=1.0)
        assert p.loc[pert, "n_significant_t-test"] == int((_bh(pv) < 0.05).sum())
    # the knock-down target is measured, significant and down; the absent one is not counted
    assert p.loc["G0+ctrl", "target_measured"]
    assert p.loc["G0+ctrl", "target_significant_wilcoxon"] is True
    assert p.loc["G0+ctrl", "target_lfc_wilcoxon"] < 0
    assert not p.loc["ABSENT+ctrl", "target_measured"]
    sig = res.summary["significant_genes"]["wilcoxon"]
    assert sig["n_perturbations_with_target_measured"] == 1
    assert sig["fraction_target_significant"] == 1.0
    assert sig["most"] and next(iter(sig["most"])) == "G0+ctrl"


def test_wilcoxon_finds_the_planted_changes(known_result) -> None:
    _, res = known_result
    p = res.per_perturbation.set_index("perturbation")
    # G0 down, G1 up (and possibly G6, zero in control) for G0+ctrl
    assert 2 <= p.loc["G0+ctrl", "n_significant_wilcoxon"] <= 3
    assert p.loc["G0+ctrl", "n_down_wilcoxon"] >= 1
    assert p.loc["G0+ctrl", "n_up_wilcoxon"] >= 1


def test_min_lfc_only_removes_genes(known_result) -> None:
    adata, _ = known_result
    strict = ps.compute_perturbation_stats(adata, min_lfc=100.0, methods=["t-test"])
    assert (strict.per_perturbation["n_significant_t-test"] == 0).all()
    assert "wilcoxon" not in strict.summary["significant_genes"]


def test_variance_decomposition_matches_direct_formula() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat(["ctrl", "A+ctrl", "B+ctrl"], [10, 7, 5])
    shift = pd.Series({"ctrl": 0.0, "A+ctrl": 1.0, "B+ctrl": 2.5})[groups].to_numpy()
    L = np.abs(rng.normal(1.0, 0.3, (22, 4)) + shift[:, None] * np.array([1, 0, 0.5, 0]))
    L[L < 0.4] = 0  # some zeros, log-normalised-looking values
    adata = ad.AnnData(
        X=sp.csr_matrix(L.astype(np.float32)),
        obs=pd.DataFrame({"condition": groups}, index=[f"c{i}" for i in range(22)]),
    )
    res = ps.compute_perturbation_stats(adata, methods=["t-test"])
    assert res.summary["input_assumed"] == ps.LOG
    L = L.astype(np.float32).astype(np.float64)
    m = L.mean(0)
    total = ((L - m) ** 2).sum(0)
    between = sum(
        (groups == g).sum() * (L[groups == g].mean(0) - m) ** 2 for g in np.unique(groups)
    )
    g = res.per_gene
    np.testing.assert_allclose(g["ss_total"], total, rtol=1e-6)
    np.testing.assert_allclose(g["ss_between"], between, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g["frac_between"] + g["frac_within"], 1.0, rtol=1e-9)
    np.testing.assert_allclose(g["var_ctrl"], L[groups == "ctrl"].var(0, ddof=1), rtol=1e-6)
    assert g["frac_between"].iloc[0] > 0.5 > g["frac_between"].iloc[1]
    pp = res.per_perturbation.set_index("perturbation")
    direct = np.median(L[groups == "A+ctrl"].var(0, ddof=1))
    assert pp.loc["A+ctrl", "median_gene_var"] == pytest.approx(direct, rel=1e-6)
    # top-DE effect vs control SD, computed directly for the first top gene of A
    top = res.top_de[res.top_de["perturbation"] == "A+ctrl"].iloc[0]
    j = int(top["gene"])
    eff = L[groups == "A+ctrl", j].mean() - L[groups == "ctrl", j].mean()
    assert top["effect"] == pytest.approx(eff, rel=1e-5)
    assert top["ctrl_sd"] == pytest.approx(L[groups == "ctrl", j].std(ddof=1), rel=1e-5)


def test_bad_input_messages(known_result) -> None:
    adata, _ = known_result
    with pytest.raises(InputError, match="--control"):
        ps.compute_perturbation_stats(adata, control="non-targeting")
    with pytest.raises(InputError, match="--condition-key"):
        ps.compute_perturbation_stats(adata, condition_key="perturbation")
    with pytest.raises(InputError, match="layer"):
        ps.compute_perturbation_stats(adata, layer="counts")
    with pytest.raises(InputError, match="DE method"):
        ps.compute_perturbation_stats(adata, methods=["deseq"])
    neg = adata.copy()
    neg.X = neg.X.copy()
    neg.X.data[0] = -1
    with pytest.raises(InputError, match="negative"):
        ps.compute_perturbation_stats(neg)


@pytest.fixture(scope="module")
def papalexi_small(papalexi_path) -> ad.AnnData:
    full = ad.read_h5ad(papalexi_path)
    keep = np.sort(np.random.default_rng(0).choice(full.n_obs, 4000, replace=False))
    return full[keep].copy()


def test_real_data_consistency(papalexi_small) -> None:
    res = ps.compute_perturbation_stats(papalexi_small)
    s, p, g = res.summary, res.per_perturbation, res.per_gene
    assert s["input_assumed"] == ps.RAW
    for v in (s["zero_fraction"]["control"], s["zero_fraction"]["perturbed"]):
        assert 0 <= v <= 1
    assert p["zero_fraction"].between(0, 1).all()
    assert g[["zero_fraction_ctrl", "zero_fraction_perturbed"]].stack().between(0, 1).all()
    for m in ("wilcoxon", "t-test"):
        n = p[f"n_significant_{m}"].dropna()
        assert (n >= 0).all() and (n <= papalexi_small.n_vars).all()
        assert 0 <= s["significant_genes"][m]["fraction_target_significant"] <= 1
        assert s["significant_genes"][m]["n_perturbations_with_target_measured"] == 9
    ok = g["ss_total"] > 0
    np.testing.assert_allclose((g["ss_within"] + g["ss_between"])[ok], g["ss_total"][ok], rtol=1e-6)
    assert 0 <= s["variance"]["fraction_between_overall"] <= 1
    # CRISPR KO of a measured gene lowers it: STAT1 knock-out
    row = p.set_index("perturbation").loc["STAT1+ctrl"]
    assert row["target_lfc_wilcoxon"] < 0


def test_cli_stats_writes_outputs(tmp_path, papalexi_small) -> None:
    data = tmp_path / "data.h5ad"
    sub = papalexi_small[:, :60].copy()
    sub.write_h5ad(data)
    out = tmp_path / "stats"
    res = CliRunner().invoke(
        app,
        [
            "stats",
            str(data),
            "--condition-key",
            "perturbation",
            "--control",
            "control",
            "--out",
            str(out),
            "--methods",
            "t-test",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "In control cells" in res.output
    s = json.loads((out / "stats.json").read_text())
    assert set(s["zero_fraction"]) == {"control", "perturbed"}
    assert s["input_assumed"] == "raw counts"
    assert len(pd.read_csv(out / "per_perturbation.csv")) == 25
    assert len(pd.read_csv(out / "per_gene.csv")) == 60
    for f in (
        "zero_fraction_hist.png",
        "n_significant.png",
        "mean_variance.png",
        "variance_fraction.png",
        "effect_vs_ctrl_sd.png",
    ):
        assert (out / f).stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "raw counts" in html and "of values are zero" in html
    bad = CliRunner().invoke(app, ["stats", str(data), "--out", str(out), "--control", "nope"])
    assert bad.exit_code == 2 and "--control" in bad.output
