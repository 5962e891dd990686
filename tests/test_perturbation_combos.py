"""GEARS combinations end to end on the real Norman subset (50 cells × 50 genes).

Its singles come as ``A+ctrl`` and ``ctrl+B``, none of its perturbed genes is measured and
most conditions hold one cell, too few for GEARS' t-test: prepare must rank those by
|mean change| (listed in ``uns['de_by_abs_change']``) instead of stopping."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from celltune.cli.main import app

NORMAN_FILE = "norman2019_gears_subset_50x50.h5ad"
TINY = [
    "--set", "model.d_model=32", "--set", "model.d_hid=32", "--set", "model.nhead=2",
    "--set", "model.nlayers=1", "--set", "data.n_eval_ctrl=5", "--set", "data.control_pool=6",
]  # fmt: skip


@pytest.fixture(scope="module")
def norman_prepared(tmp_path_factory: pytest.TempPathFactory, adamson_mini_path: Path) -> Path:
    norman = adamson_mini_path.parent / NORMAN_FILE
    out = tmp_path_factory.mktemp("norman") / "data.h5ad"
    res = CliRunner().invoke(app, ["perturb", "prepare", str(norman), "-o", str(out), "--not-raw"])
    assert res.exit_code == 0, res.output
    return out


def test_prepare_ranks_single_cell_conditions_by_change(norman_prepared: Path):
    adata = ad.read_h5ad(norman_prepared)
    cond = adata.obs["condition"].astype(str)
    assert not cond.str.startswith("ctrl+").any()  # ctrl+B spelled B+ctrl
    sizes = adata.obs["condition_name"].astype(str).value_counts()
    small = set(adata.uns["de_by_abs_change"])
    assert small == {n for n, k in sizes.items() if k < 2}
    assert small and all(len(adata.uns["top_non_zero_de_20"][n]) <= 20 for n in small)
    # a 2-cell condition still gets GEARS' t-test
    assert "A549_COL1A1+ctrl_1+1" not in small
    # direct check of the fallback ranking for one single-cell condition
    name = sorted(small)[0]
    X = adata.X.toarray()
    ctrl = X[(cond == "ctrl").to_numpy()].mean(axis=0)
    x = X[(adata.obs["condition_name"].astype(str) == name).to_numpy()].mean(axis=0)
    order = adata.var_names[np.argsort(-np.abs(x - ctrl), kind="stable")]
    assert list(adata.uns["rank_genes_groups_cov_all"][name][:5]) == list(order[:5])


@pytest.mark.e2e
def test_combos_train_predict_evaluate(norman_prepared: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = CliRunner()
    res = r.invoke(
        app,
        ["perturb", "train", str(norman_prepared), "--out", str(run), "--epochs", "1",
         "--batch-size", "8", "--device", "cpu", "-q", *TINY],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["perturb", "evaluate", str(run), "-q"])
    assert res.exit_code == 0, res.output
    m = json.loads((run / "metrics.json").read_text())
    scope = m["scopes"]["all"]
    groups = set(scope["additive"]["subgroups"])
    assert {"unseen_single"} < groups and any(g.startswith("combo_seen") for g in groups)
    assert {"celltune", "additive", "train_mean", "noise_ceiling"} <= set(scope)
    assert scope["noise_ceiling"]["n_without_ceiling"] > 0
    combo = next(c for c in scope["celltune"]["subgroups"] if c.startswith("combo"))
    assert scope["celltune"]["subgroups"][combo]["n_perturbations"] >= 1
    out = tmp_path / "pred.csv"
    res = r.invoke(app, ["perturb", "predict", str(run), "-p", "FOXL2+HOXB9", "--out", str(out),
                         "--n-ctrl", "4", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "FOXL2+HOXB9" in out.read_text()
