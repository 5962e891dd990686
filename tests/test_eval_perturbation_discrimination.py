"""Discrimination / DE-overlap / Systema metrics and the split-half ceiling.

Hand-made profiles with known answers, checked against direct computations; then the
real Adamson mini file for the ceiling (its conditions hold 10-40 cells)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from celltune.data.gears import load_prepared
from celltune.eval.perturbation import eval_inputs_from_adata, evaluate_predictions
from celltune.eval.perturbation_ceiling import noise_ceiling, split_halves
from celltune.eval.perturbation_discrimination import (
    current_metrics,
    de_overlap,
    discrimination_scores,
)


def _profiles(n_perts: int = 12, n_genes: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    ctrl = rng.gamma(2.0, 0.5, n_genes)
    true = {f"G{i}+ctrl": ctrl + rng.normal(0, 0.4, n_genes) for i in range(n_perts)}
    return ctrl, true


def test_perfect_predictor_scores_one_and_mean_predictor_half():
    _, true = _profiles()
    perfect = discrimination_scores(true, true)
    assert all(v == 1.0 for v in perfect.values())
    avg = np.mean(list(true.values()), axis=0)
    mean_pred = discrimination_scores({c: avg for c in true}, true)
    # one prediction for every perturbation: its ranks are a permutation, mean exactly 0.5
    assert np.mean(list(mean_pred.values())) == pytest.approx(0.5)
    assert min(mean_pred.values()) < 0.3 < 0.7 < max(mean_pred.values())


def test_discrimination_matches_direct_rank_and_excludes_target():
    _, true = _profiles(n_perts=5, n_genes=8, seed=3)
    conds = list(true)
    rng = np.random.default_rng(1)
    pred = {c: v + rng.normal(0, 0.3, v.size) for c, v in true.items()}
    got = discrimination_scores(pred, true)
    for c in conds:
        d = {o: np.abs(pred[c] - true[o]).sum() for o in conds}
        rank = sum(d[o] < d[c] for o in conds if o != c)
        assert got[c] == pytest.approx(1 - rank / (len(conds) - 1))
    # the target gene alone points to B: counted, A loses; left out, A is the nearest
    truth = {"A+ctrl": np.array([0.0, 0.0, 0.0]), "B+ctrl": np.array([10.0, 0.5, 0.0])}
    pred_a = {"A+ctrl": np.array([10.0, 0.0, 0.0]), "B+ctrl": truth["B+ctrl"]}
    assert discrimination_scores(pred_a, truth)["A+ctrl"] == 0.0
    assert discrimination_scores(pred_a, truth, {"A+ctrl": [0]})["A+ctrl"] == 1.0


def test_de_overlap_direction_mae_and_pert_mean_delta_direct():
    ctrl = np.zeros(6)
    true = np.array([3.0, -2.0, 0.1, 1.0, 0.0, 0.0])
    pred = np.array([2.0, 0.5, 0.0, -1.5, 0.0, 0.0])
    de = np.array([0, 1, 3])  # true DE ranking
    # top-3 predicted |P - C| = genes 0, 3, 1 -> all of the true DE genes
    assert de_overlap(pred, ctrl, de, 3, np.array([], int)) == 1.0
    # with gene 3 excluded (a target), gene 2 enters neither list; 2 of 3 true DE found
    assert de_overlap(pred, ctrl, de, 3, np.array([3])) == pytest.approx(2 / 3)
    pert_mean = np.full(6, 0.5)
    m = current_metrics(pred, true, ctrl, pert_mean, de, [])
    assert m["mae"] == pytest.approx(np.abs(pred - true).mean())
    assert m["mae_de"] == pytest.approx(np.abs(pred[de] - true[de]).mean())
    # signs on DE genes: + vs +, + vs -, - vs +  -> 1/3
    assert m["de_direction_agreement"] == pytest.approx(1 / 3)
    assert m["pearson_delta_pert_mean"] == pytest.approx(
        np.corrcoef(pred - pert_mean, true - pert_mean)[0, 1]
    )
    # the perturbation mean itself (Train Mean) has no signal against that reference
    assert current_metrics(pert_mean, true, ctrl, pert_mean, de)["pearson_delta_pert_mean"] == 0


def test_evaluate_predictions_adds_current_metrics_and_perfect_beats_mean():
    ctrl, true_means = _profiles()
    rng = np.random.default_rng(5)
    cells = {c: m + rng.normal(0, 0.05, (6, m.size)) for c, m in true_means.items()}
    de = {c: np.argsort(-np.abs(true_means[c] - ctrl))[:20] for c in cells}
    obs_means = {c: v.mean(axis=0) for c, v in cells.items()}
    pert_mean = np.mean(list(obs_means.values()), axis=0)
    _, perfect = evaluate_predictions(obs_means, cells, ctrl, de, pert_mean=pert_mean)
    _, mean = evaluate_predictions(
        {c: pert_mean for c in cells}, cells, ctrl, de, pert_mean=pert_mean
    )
    assert perfect["all"]["discrimination_l1"] == 1.0
    assert perfect["all"]["mae"] < mean["all"]["mae"]
    assert mean["all"]["discrimination_l1"] == pytest.approx(0.5)
    assert mean["all"]["pearson_delta_pert_mean"] == 0.0
    assert perfect["all"]["pearson_delta_pert_mean"] > 0.99


def test_split_halves_skips_single_cells_and_is_seeded():
    cells = {"A+ctrl": np.ones((1, 3)), "B+ctrl": np.arange(12.0).reshape(4, 3)}
    first, second, small = split_halves(cells, seed=0)
    assert small == ["A+ctrl"] and set(first) == {"B+ctrl"}
    assert second["B+ctrl"].shape == (2, 3)
    again, _, _ = split_halves(cells, seed=0)
    assert np.array_equal(first["B+ctrl"], again["B+ctrl"])


def test_noise_ceiling_on_adamson_beats_train_mean(adamson_mini_path: Path):
    from celltune.eval.perturbation_baselines import PerturbationBaselines

    adata = load_prepared(adamson_mini_path)
    adata.obs["split"] = "train"  # score all 10 perturbations (no model is trained here)
    inputs = eval_inputs_from_adata(adata, split="train")
    kw = dict(pert_mean=inputs["pert_mean"], target_idx=inputs["target_idx"])
    per, ceiling = noise_ceiling(
        inputs["true_cells"], inputs["ctrl_mean"], inputs["de_idx"], seed=0, **kw
    )
    assert ceiling["n_without_ceiling"] == 0 and len(per) == len(inputs["true_cells"])
    base = PerturbationBaselines(adata)
    tm = base.predict("train_mean", list(inputs["true_cells"]))
    _, tm_summary = evaluate_predictions(
        tm, inputs["true_cells"], inputs["ctrl_mean"], inputs["de_idx"], **kw
    )
    assert ceiling["all"]["discrimination_l1"] > tm_summary["all"]["discrimination_l1"]
    assert ceiling["all"]["pearson_delta_pert_mean"] > tm_summary["all"]["pearson_delta_pert_mean"]
