"""perturb benchmark: paired comparison / aggregation on hand-made numbers, and a
2-seed CLI run on the real Adamson mini file (tiny model, 2 steps per epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from celltune.cli.main import app
from celltune.report.perturbation_benchmark import aggregate, paired_comparison

PER_SEED = {
    1: {"celltune": {"r": 0.6, "mae": 0.10}, "a": {"r": 0.5, "mae": 0.20},
        "b": {"r": 0.55, "mae": 0.05}, "noise_ceiling": {"r": 0.9, "mae": 0.01}},
    2: {"celltune": {"r": 0.4, "mae": 0.10}, "a": {"r": 0.5, "mae": 0.30},
        "b": {"r": 0.45, "mae": 0.40}, "noise_ceiling": {"r": 0.9, "mae": 0.01}},
    3: {"celltune": {"r": 0.7, "mae": 0.10}, "a": {"r": 0.6, "mae": 0.20},
        "b": {"r": 0.5, "mae": 0.30}, "noise_ceiling": {"r": 0.9, "mae": 0.01}},
}  # fmt: skip


def test_paired_comparison_uses_best_baseline_per_seed_and_direction():
    p = paired_comparison(PER_SEED, ("r", "mae")).set_index("metric")
    # r: best baselines b (0.55), a (0.5), a (0.6) -> diffs +0.05, -0.1, +0.1; the ceiling
    # is never the baseline
    assert p.loc["r", "best_baselines"] == "b,a,a"
    assert p.loc["r", "wins"] == 2 and p.loc["r", "k"] == 3
    assert p.loc["r", "mean_diff"] == pytest.approx(np.mean([0.05, -0.1, 0.1]))
    assert p.loc["r", "ci_low"] <= p.loc["r", "mean_diff"] <= p.loc["r", "ci_high"]
    # mae: smaller is better; best b (0.05), a (0.3), a (0.2) -> +diff favours the model
    assert p.loc["mae", "best_baselines"] == "b,a,a"
    assert p.loc["mae", "mean_diff"] == pytest.approx(np.mean([-0.05, 0.2, 0.1]))
    assert p.loc["mae", "wins"] == 2


def test_aggregate_mean_and_sd_over_seeds():
    t = aggregate(PER_SEED, ("r",))
    assert t.loc["celltune", "r_mean"] == pytest.approx(np.mean([0.6, 0.4, 0.7]))
    assert t.loc["celltune", "r_sd"] == pytest.approx(np.std([0.6, 0.4, 0.7], ddof=1))
    assert t.loc["noise_ceiling", "r_sd"] == pytest.approx(0.0)


@pytest.mark.e2e
def test_benchmark_cli_two_seeds_on_adamson(adamson_mini_path: Path, tmp_path: Path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(
        app,
        ["perturb", "benchmark", str(adamson_mini_path), "--out", str(out), "--not-raw",
         "--seeds", "2", "--epochs", "1", "--device", "cpu", "-q",
         "--set", "model.d_model=32", "--set", "model.d_hid=32", "--set", "model.nhead=2",
         "--set", "model.nlayers=1", "--set", "train.max_steps_per_epoch=2",
         "--set", "data.n_eval_ctrl=20", "--set", "data.control_pool=30"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["seeds"] == [1, 2] and set(m["per_seed"]) == {"1", "2"}
    assert {"celltune", "train_mean", "linear", "noise_ceiling"} <= set(m["summary"])
    metrics = {r["metric"] for r in m["paired_vs_best_baseline"]}
    assert {"pearson_delta", "discrimination_l1", "mae"} <= metrics
    assert all(r["k"] == 2 for r in m["paired_vs_best_baseline"])
    for name in ("report.html", "benchmark_summary.csv", "benchmark_paired.csv"):
        assert (out / name).is_file(), name
    assert (out / "seed_2" / "run" / "metrics.json").is_file()


def test_benchmark_one_seed_is_input_error(adamson_mini_path: Path, tmp_path: Path):
    res = CliRunner().invoke(
        app,
        ["perturb", "benchmark", str(adamson_mini_path), "--out", str(tmp_path), "--seeds", "1"],
    )
    assert res.exit_code == 2 and "at least 2 split seeds" in res.output
