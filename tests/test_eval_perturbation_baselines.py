"""Perturbation baselines, metrics and plots on real Papalexi 2021 ECCITE-seq data.

The fixture builds a GEARS-form AnnData itself (normalise + log1p, random
perturbation-level split, DE by scanpy's t-test against control), subsampled for speed.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

from celltune.errors import InputError
from celltune.eval.perturbation import eval_inputs_from_adata, evaluate_predictions
from celltune.eval.perturbation_baselines import (
    BASELINES,
    PerturbationBaselines,
    condition_means,
)
from celltune.report.perturbation_plots import plot_de_boxplot, plot_delta_scatter

CELLS_PER_CONDITION = 120


def make_gears_like(
    path: Path, per_condition: int = CELLS_PER_CONDITION, seed: int = 0
) -> ad.AnnData:
    """Papalexi in GEARS form: condition/condition_name/split, DE top-20 lists in uns."""
    raw = ad.read_h5ad(path)
    rng = np.random.default_rng(seed)
    keep = []
    for _, rows in raw.obs.groupby("condition", observed=True).indices.items():
        keep.extend(rng.choice(rows, size=min(per_condition, rows.size), replace=False))
    a = raw[np.sort(keep)].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.obs["condition"] = a.obs["condition"].astype(str)
    a.obs["condition_name"] = [
        "THP1_" + c + ("_1" if c == "ctrl" else "_1+1") for c in a.obs["condition"]
    ]
    perts = sorted(set(a.obs["condition"]) - {"ctrl"})
    test = set(rng.choice(perts, size=6, replace=False))
    val = set(rng.choice(sorted(set(perts) - test), size=3, replace=False))
    a.obs["split"] = [
        "test" if c in test else "val" if c in val else "train" for c in a.obs["condition"]
    ]
    sc.tl.rank_genes_groups(
        a,
        groupby="condition_name",
        reference="THP1_ctrl_1",
        rankby_abs=True,
        n_genes=a.n_vars,
        use_raw=False,
        method="t-test",
    )
    names = a.uns["rank_genes_groups"]["names"]
    X = a.X.toarray()
    cond = a.obs["condition_name"].to_numpy()
    ctrl_mean = X[cond == "THP1_ctrl_1"].mean(0)
    pos = {g: i for i, g in enumerate(a.var_names)}
    nd, nz = {}, {}
    for name in names.dtype.names:
        ranked = list(names[name])
        mean_p = X[cond == name].mean(0)
        non_zero = mean_p != 0
        non_dropout = non_zero | ((mean_p == 0) & (ctrl_mean == 0))
        nd[name] = [g for g in ranked if non_dropout[pos[g]]][:20]
        nz[name] = [g for g in ranked if non_zero[pos[g]]][:20]
    a.uns["top_non_dropout_de_20"] = nd
    a.uns["top_non_zero_de_20"] = nz
    return a


@pytest.fixture(scope="module")
def gears_adata(papalexi_path: Path) -> ad.AnnData:
    return make_gears_like(papalexi_path)


def test_baselines_follow_their_definitions(gears_adata: ad.AnnData) -> None:
    base = PerturbationBaselines(gears_adata)
    inputs = eval_inputs_from_adata(gears_adata)
    test = list(inputs["true_cells"])
    assert len(test) == 6
    preds = base.predict_all(test)
    assert set(preds) == set(BASELINES)
    means = condition_means(gears_adata)
    train = [c for c in means if c != "ctrl" and c in base.train]
    assert set(base.train).isdisjoint(test)
    # ctrl = control mean; Train Mean = unweighted mean of training-perturbation means.
    for c in test:
        np.testing.assert_allclose(preds["ctrl"][c], means["ctrl"])
        np.testing.assert_allclose(
            preds["train_mean"][c], np.mean([means[t] for t in train], axis=0), rtol=1e-10
        )
        assert np.all(preds["linear"][c] >= 0) and np.isfinite(preds["linear"][c]).all()
    # Unseen singles have no single-gene delta: additive = ctrl + Train Mean change.
    for c in test:
        np.testing.assert_allclose(
            preds["additive"][c],
            np.maximum(means["ctrl"] + base.train_mean - base.ctrl, 0),
        )
    # A seen single under the additive model is its own training mean (clipped at 0).
    seen = base.train[0]
    np.testing.assert_allclose(base.predict("additive", [seen])[seen], np.maximum(means[seen], 0))
    # Linear model: perturbations of an unmeasured gene fall back to Train Mean; measured
    # genes get their own prediction.
    measured = set(gears_adata.var["gene_name"])
    for c in test:
        gene = c.split("+")[0]
        same = np.allclose(preds["linear"][c], preds["train_mean"][c])
        assert same == (gene not in measured)


def test_linear_baseline_recovers_linear_effects() -> None:
    """Effects that are exactly linear in the gene embedding are predicted for unseen genes."""
    rng = np.random.default_rng(0)
    n_genes, n_cells = 30, 12
    genes = [f"g{i}" for i in range(n_genes)]
    ctrl = rng.uniform(2, 3, size=n_genes)
    loadings = rng.normal(size=(n_genes, 2))
    conds, X = ["ctrl"] * n_cells, [ctrl + rng.normal(0, 0.01, size=(n_cells, n_genes))]
    for i in range(20):  # effect of knocking out g_i = loadings @ loadings[i]
        conds += [f"g{i}+ctrl"] * n_cells
        X.append(np.tile(ctrl + 0.1 * loadings @ loadings[i], (n_cells, 1)))
    a = ad.AnnData(np.vstack(X).astype(np.float64))
    a.var["gene_name"] = genes
    a.obs["condition"] = conds
    a.obs["split"] = ["test" if c in ("g18+ctrl", "g19+ctrl") else "train" for c in conds]
    base = PerturbationBaselines(a, n_pcs=4, ridge=1e-6)
    pred = base.predict("linear", ["g18+ctrl", "g19+ctrl"])
    truth = condition_means(a, ["g18+ctrl", "g19+ctrl"])
    for c in pred:
        d_pred, d_true = pred[c] - base.ctrl, truth[c] - base.ctrl
        assert np.corrcoef(d_pred, d_true)[0, 1] > 0.95
    tm = base.predict("train_mean", ["g18+ctrl"])["g18+ctrl"] - base.ctrl
    assert np.corrcoef(tm, truth["g18+ctrl"] - base.ctrl)[0, 1] < 0.95


def test_metrics_and_plots_on_real_data(gears_adata: ad.AnnData, tmp_path: Path) -> None:
    inputs = eval_inputs_from_adata(gears_adata)
    assert inputs["subgroups"] == {"unseen_single": sorted(inputs["true_cells"])}
    preds = PerturbationBaselines(gears_adata).predict_all(list(inputs["true_cells"]))
    summaries = {}
    for method, p in preds.items():
        per, summ = evaluate_predictions(p, **inputs)
        assert len(per) == 6
        vals = per.drop(columns="subgroup").to_numpy(dtype=float)
        assert np.isfinite(vals).all()
        summaries[method] = summ
    # No change → every delta correlation is 0; Train Mean → identical predicted deltas.
    assert summaries["ctrl"]["all"]["pearson_delta"] == 0.0
    assert summaries["train_mean"]["delta_similarity"]["pred_delta_pairwise_pearson"] == (
        pytest.approx(1.0)
    )
    assert summaries["train_mean"]["all"]["pearson_delta_centered"] == 0.0
    assert summaries["ctrl"]["all"]["pearson"] > 0.9  # absolute Pearson is uninformative
    c = next(iter(inputs["true_cells"]))
    box = plot_de_boxplot(
        c,
        inputs["true_cells"][c],
        inputs["ctrl_mean"],
        inputs["de_idx"][c],
        list(gears_adata.var["gene_name"]),
        {m: p[c] for m, p in preds.items()},
        tmp_path / "box.png",
    )
    true_means = {k: v.mean(0) for k, v in inputs["true_cells"].items()}
    sc_path = plot_delta_scatter(
        list(true_means),
        true_means,
        preds,
        inputs["ctrl_mean"],
        tmp_path / "scatter.png",
        de_idx=inputs["de_idx"],
    )
    for p in (box, sc_path):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_input(gears_adata: ad.AnnData) -> None:
    no_ctrl = gears_adata[gears_adata.obs["condition"] != "ctrl"].copy()
    with pytest.raises(InputError, match="control"):
        PerturbationBaselines(no_ctrl)
    no_split = gears_adata.copy()
    del no_split.obs["split"]
    with pytest.raises(InputError, match="split"):
        PerturbationBaselines(no_split)
    with pytest.raises(InputError, match="GEARS form"):
        PerturbationBaselines(gears_adata).predict("ctrl", ["+"])
    with pytest.raises(InputError, match="no perturbations in split"):
        eval_inputs_from_adata(gears_adata, split="holdout")
