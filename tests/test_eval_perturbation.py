"""GEARS/scGPT perturbation metrics on small hand-made inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from celltune.errors import InputError
from celltune.eval.perturbation import (
    assign_subgroups,
    delta_similarity,
    evaluate_predictions,
    pearson,
    perturbation_metrics,
    summary_table,
)


def test_pearson_matches_scipy_and_nan_becomes_zero() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert pearson(np.ones(5), x[:5]) == 0.0  # constant → NaN in scipy → 0 as GEARS
    assert pearson([1.0], [2.0]) == 0.0


def _toy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    ctrl = rng.uniform(0.5, 2.0, size=30)
    shift = np.zeros(30)
    shift[:5] = [1.0, -0.8, 0.6, -0.4, 0.9]
    cells = ctrl + shift + rng.normal(scale=0.2, size=(40, 30))
    return ctrl, cells, np.arange(5)


def test_perfect_prediction_scores_one_and_zero_error() -> None:
    ctrl, cells, de = _toy()
    truth = cells.mean(0)
    m = perturbation_metrics(truth, cells, ctrl, de, non_dropout_idx=de, non_zero_idx=de)
    for k in (
        "pearson",
        "pearson_de",
        "pearson_delta",
        "pearson_de_delta",
        "pearson_top20_de_non_dropout",
        "pearson_delta_top20_de_non_zero",
    ):
        assert m[k] == pytest.approx(1.0), k
    assert m["mse"] == 0.0 and m["mse_de"] == 0.0
    assert m["frac_correct_direction_top20_de_non_dropout"] == 1.0
    assert m["frac_in_range_top20_de_non_dropout"] == 1.0
    assert m["mean_sigma_top20_de_non_dropout"] == 0.0


def test_metrics_against_direct_numpy() -> None:
    ctrl, cells, de = _toy()
    rng = np.random.default_rng(2)
    pred = ctrl + rng.normal(scale=0.3, size=30)
    T = cells.mean(0)
    m = perturbation_metrics(pred, cells, ctrl, de, non_dropout_idx=de)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred, T)[0])
    assert m["pearson_delta"] == pytest.approx(stats.pearsonr(pred - ctrl, T - ctrl)[0])
    assert m["pearson_de_delta"] == pytest.approx(
        stats.pearsonr(pred[de] - ctrl[de], T[de] - ctrl[de])[0]
    )
    assert m["mse"] == pytest.approx(np.mean((pred - T) ** 2))
    assert m["mse_de"] == pytest.approx(np.mean((pred[de] - T[de]) ** 2))
    sign = np.mean(np.sign(pred[de] - ctrl[de]) == np.sign(T[de] - ctrl[de]))
    assert m["frac_correct_direction_top20_de_non_dropout"] == pytest.approx(sign)
    lo, hi = cells[:, de].min(0), cells[:, de].max(0)
    assert m["frac_in_range_top20_de_non_dropout"] == pytest.approx(
        np.mean((pred[de] >= lo) & (pred[de] <= hi))
    )
    q25, q75 = np.quantile(cells[:, de], [0.25, 0.75], axis=0)
    assert m["frac_in_range_25_75_top20_de_non_dropout"] == pytest.approx(
        np.mean((pred[de] >= q25) & (pred[de] <= q75))
    )
    assert m["mean_sigma_top20_de_non_dropout"] == pytest.approx(
        np.mean(np.abs(pred[de] - T[de]) / cells[:, de].std(0))
    )


def test_no_change_prediction_has_zero_delta_correlation() -> None:
    ctrl, cells, de = _toy()
    m = perturbation_metrics(ctrl, cells, ctrl, de)
    assert m["pearson_delta"] == 0.0 and m["pearson_de_delta"] == 0.0  # constant 0 → NaN → 0
    assert m["pearson"] > 0.5  # absolute Pearson still looks good: why deltas matter


def test_one_average_change_for_everything_is_visible() -> None:
    """scGPT issue #277: a model predicting the mean change for every perturbation."""
    rng = np.random.default_rng(3)
    ctrl = rng.uniform(1, 2, size=40)
    true_cells, de, truth = {}, {}, {}
    for i in range(6):
        delta = np.zeros(40)
        delta[i * 5 : i * 5 + 5] = rng.choice([-1.0, 1.0], size=5)
        delta += 0.3  # a shared component, as in real screens
        cells = ctrl + delta + rng.normal(scale=0.1, size=(20, 40))
        true_cells[f"G{i}+ctrl"], de[f"G{i}+ctrl"] = cells, np.arange(i * 5, i * 5 + 5)
        truth[f"G{i}+ctrl"] = cells.mean(0)
    avg = np.mean(list(truth.values()), axis=0)
    collapsed = {c: avg for c in truth}
    per, summ = evaluate_predictions(collapsed, true_cells, ctrl, de)
    sim = summ["delta_similarity"]
    assert sim["pred_delta_pairwise_pearson"] == pytest.approx(1.0)
    assert sim["true_delta_pairwise_pearson"] < 0.5
    assert sim["pred_delta_spread"] == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(per["pearson_delta_centered"], 0.0)
    per_ok, summ_ok = evaluate_predictions(truth, true_cells, ctrl, de)
    assert np.allclose(per_ok["pearson_delta_centered"], 1.0)
    assert summ_ok["delta_similarity"]["pairwise_pearson_excess"] == pytest.approx(0.0, abs=1e-9)


def test_subgroups_and_summary() -> None:
    groups = assign_subgroups(
        ["A+ctrl", "D+ctrl", "A+B", "A+D", "D+E"], ["A+ctrl", "B+ctrl", "C+ctrl", "B+C"]
    )
    assert groups == {
        "unseen_single": ["D+ctrl"],
        "combo_seen0": ["D+E"],
        "combo_seen1": ["A+D"],
        "combo_seen2": ["A+B"],
        "seen_single": ["A+ctrl"],
    }
    ctrl, cells, de = _toy()
    true_cells = {"D+ctrl": cells, "D+E": cells[:20], "A+D": cells[20:]}
    preds = {c: v.mean(0) for c, v in true_cells.items()}
    per, summ = evaluate_predictions(
        preds, true_cells, ctrl, dict.fromkeys(true_cells, de), subgroups=groups
    )
    assert list(per["subgroup"]) == ["unseen_single", "combo_seen0", "combo_seen1"]
    assert summ["all"]["n_perturbations"] == 3
    assert set(summ["subgroups"]) == {"unseen_single", "combo_seen0", "combo_seen1"}
    assert summ["subgroups"]["unseen_single"]["pearson_delta"] == pytest.approx(1.0)
    table = summary_table({"truth": summ}, ["pearson_delta", "mse"])
    assert list(table["subgroup"]) == ["all", "unseen_single", "combo_seen0", "combo_seen1"]


def test_bad_input() -> None:
    ctrl, cells, de = _toy()
    with pytest.raises(InputError, match="no prediction"):
        evaluate_predictions({}, {"A+ctrl": cells}, ctrl, {"A+ctrl": de})
    with pytest.raises(InputError, match="DE genes"):
        evaluate_predictions({"A+ctrl": ctrl}, {"A+ctrl": cells}, ctrl, {})
    with pytest.raises(InputError, match="shape mismatch"):
        perturbation_metrics(ctrl[:10], cells, ctrl, de)
    with pytest.raises(InputError, match="no test perturbations"):
        evaluate_predictions({}, {}, ctrl, {})
    assert delta_similarity({"A": ctrl}, {"A": ctrl}, ctrl)["n_perturbations"] == 1.0
