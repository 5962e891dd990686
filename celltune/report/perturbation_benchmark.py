"""``celltune perturb benchmark``: K split seeds, model vs every baseline, with uncertainty.

One split seed and a handful of test perturbations cannot tell a model from Train Mean
(issue 15). For each seed this prepares a GEARS-style split of unseen perturbations,
trains the model, and scores it, every baseline and the split-half noise ceiling with
:func:`celltune.report.perturbation_run.evaluate_perturbation_run`. It then writes

- ``DIR/metrics.json``: per seed, and mean ± sd over seeds per metric and method;
- a paired comparison of the model against the best baseline *of each seed and metric*
  (wins out of K, mean difference with a seed-bootstrap 95 % interval);
- ``DIR/benchmark_summary.csv``, ``DIR/benchmark_paired.csv``, a plot and ``report.html``.

It sits in the report layer because it combines data preparation, training and evaluation.
The model's random seed stays fixed (``train.seed``); only the split changes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: metrics where smaller is better (every other metric: larger is better)
LOWER_IS_BETTER = ("mse", "mse_de", "mae", "mae_de")
MODEL = "celltune"
CEILING = "noise_ceiling"
HEADLINE = (
    "pearson_delta",
    "pearson_de_delta",
    "discrimination_l1",
    "pearson_delta_pert_mean",
    "de_overlap_at_20",
    "mae",
)


def paired_comparison(
    per_seed: dict[int, dict[str, dict[str, float]]],
    metrics: tuple[str, ...],
    *,
    model: str = MODEL,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Model minus the best baseline of each seed, per metric (positive = model better).

    ``per_seed[s][method][metric]``. The best baseline is picked per seed and metric among
    every method except the model and the noise ceiling; a smaller-is-better metric's
    difference is sign-flipped so that a positive difference always favours the model.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for m in metrics:
        sign = -1.0 if m in LOWER_IS_BETTER else 1.0
        diffs, best_names = [], []
        for s in sorted(per_seed):
            methods = per_seed[s]
            if model not in methods or not np.isfinite(methods[model].get(m, np.nan)):
                continue
            base = {
                k: v[m]
                for k, v in methods.items()
                if k not in (model, CEILING) and np.isfinite(v.get(m, np.nan))
            }
            if not base:
                continue
            best = max(base, key=lambda k: sign * base[k])
            diffs.append(sign * (methods[model][m] - base[best]))
            best_names.append(best)
        if not diffs:
            continue
        d = np.asarray(diffs)
        boot = rng.choice(d, (n_boot, d.size), replace=True).mean(axis=1)
        rows.append(
            {
                "metric": m,
                "k": d.size,
                "wins": int((d > 0).sum()),
                "mean_diff": float(d.mean()),
                "ci_low": float(np.quantile(boot, 0.025)),
                "ci_high": float(np.quantile(boot, 0.975)),
                "best_baselines": ",".join(best_names),
            }
        )
    return pd.DataFrame(rows)


def aggregate(
    per_seed: dict[int, dict[str, dict[str, float]]], metrics: tuple[str, ...]
) -> pd.DataFrame:
    """Rows = method; columns ``metric_mean`` / ``metric_sd`` (sd over seeds, ddof 1)."""
    methods = list(dict.fromkeys(k for s in per_seed.values() for k in s))
    rows = []
    for name in methods:
        row: dict[str, Any] = {"method": name}
        for m in metrics:
            vals = np.array(
                [per_seed[s][name].get(m, np.nan) for s in per_seed if name in per_seed[s]],
                dtype=np.float64,
            )
            vals = vals[np.isfinite(vals)]
            row[f"{m}_mean"] = float(vals.mean()) if vals.size else float("nan")
            row[f"{m}_sd"] = float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
        row["k"] = sum(name in s for s in per_seed.values())
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def _plot(per_seed: dict[int, dict[str, dict[str, float]]], metrics: tuple[str, ...], path: Path):
    """One panel per metric: every seed's value (dots) and the mean (bar) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from celltune.files import atomic_path

    methods = list(dict.fromkeys(k for s in per_seed.values() for k in s))
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for i, name in enumerate(methods):
            vals = [per_seed[s][name].get(m, np.nan) for s in per_seed if name in per_seed[s]]
            ax.bar(i, np.nanmean(vals), color="#bbb" if name == CEILING else "#4c72b0")
            ax.scatter(np.full(len(vals), i), vals, s=10, color="k", zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=90, fontsize=7)
        ax.set_title(m, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def run_benchmark(
    data: str | Path,
    out: str | Path,
    cfg: Any,
    *,
    seeds: int = 5,
    first_seed: int = 1,
    split: str = "simulation",
    data_is_raw: bool = True,
    n_hvg: int = 5000,
    n_ctrl: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """The ``benchmark`` command as a function; returns the content of ``metrics.json``."""
    from celltune.data.io import read_h5ad
    from celltune.errors import InputError
    from celltune.files import atomic_path, write_json_atomic
    from celltune.report.perturbation_run import TABLE_METRICS

    if seeds < 2:
        raise InputError(f"--seeds {seeds}: a benchmark needs at least 2 split seeds")
    t0 = time.perf_counter()
    out = Path(out)
    raw = read_h5ad(data)
    metrics = tuple(dict.fromkeys((*TABLE_METRICS, "mae_de", "de_overlap_at_10")))
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    seed_info: dict[int, dict[str, Any]] = {}
    test_sets: dict[tuple[str, ...], int] = {}
    for s in range(first_seed, first_seed + seeds):
        per_seed[s], seed_info[s] = _run_seed(
            raw,
            s,
            out / f"seed_{s}",
            cfg,
            test_sets,
            split=split,
            data_is_raw=data_is_raw,
            n_hvg=n_hvg,
            n_ctrl=n_ctrl,
            quiet=quiet,
        )

    table = aggregate(per_seed, metrics)
    paired = paired_comparison(per_seed, metrics)
    with atomic_path(out / "benchmark_summary.csv") as tmp:
        table.to_csv(tmp)
    with atomic_path(out / "benchmark_paired.csv") as tmp:
        paired.to_csv(tmp, index=False)
    images = []
    try:
        images.append(_plot(per_seed, HEADLINE, out / "benchmark_metrics.png"))
    except Exception as err:  # a plot must not sink a finished benchmark
        logger.warning("benchmark plot failed: %s: %s", type(err).__name__, err)
    result = {
        "data": str(data),
        "split": split,
        "seeds": list(per_seed),
        "n_distinct_test_sets": len(test_sets),
        "model_seed": int(cfg.train.seed),
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "seed_info": {str(s): v for s, v in seed_info.items()},
        "summary": {
            name: {m: {"mean": row[f"{m}_mean"], "sd": row[f"{m}_sd"]} for m in metrics}
            for name, row in table.iterrows()
        },
        "paired_vs_best_baseline": paired.to_dict(orient="records"),
        "notes": "mean ± sd over split seeds; paired: model minus the best baseline of each "
        "seed and metric, sign-flipped for mse/mae so that > 0 favours the model; 95% "
        "interval from 2000 bootstrap resamples of the seeds. noise_ceiling: half of each "
        "test perturbation's cells vs the other half (one-cell perturbations have none).",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out / "metrics.json", result)
    _write_html(out, result, table, paired, images, split)
    return result


def _run_seed(
    raw: Any,
    s: int,
    root: Path,
    cfg: Any,
    test_sets: dict[tuple[str, ...], int],
    *,
    split: str,
    data_is_raw: bool,
    n_hvg: int,
    n_ctrl: int | None,
    quiet: bool,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Prepare, train and evaluate one split seed; its summary metrics and facts."""
    from celltune.data.gears import prepare_perturbation_data, write_prepared
    from celltune.report.perturbation_run import evaluate_perturbation_run
    from celltune.tasks.perturbation import train_perturbation_model

    t_seed = time.perf_counter()
    prepared = prepare_perturbation_data(
        raw, split=split, seed=s, data_is_raw=data_is_raw, n_hvg=n_hvg
    )
    test = tuple(sorted(prepared.uns["split_subgroups"]))
    if test in test_sets:
        logger.warning("split seed %d repeats the test set of seed %d", s, test_sets[test])
    test_sets.setdefault(test, s)
    write_prepared(prepared, root / "data.h5ad")
    run = train_perturbation_model(root / "data.h5ad", root / "run", cfg)
    m = evaluate_perturbation_run(root / "run", n_ctrl=n_ctrl, quiet=quiet, n_plots=0)
    scope = "measured" if "measured" in m["scopes"] else "all"
    if MODEL not in m["scopes"][scope]:
        logger.warning("seed %d: the model cannot flag every test perturbation", s)
    info = {
        "scope": scope,
        "test_perturbations": list(test),
        "n_scored": m["scopes"][scope][next(iter(m["scopes"][scope]))]["all"]["n_perturbations"],
        "fit_seconds": run.info.get("fit_seconds"),
        "seconds": round(time.perf_counter() - t_seed, 1),
    }
    logger.info("seed %d done in %.0f s", s, info["seconds"])
    return {k: v["all"] for k, v in m["scopes"][scope].items()}, info


def _write_html(
    out: Path,
    result: dict[str, Any],
    table: Any,
    paired: Any,
    images: list[Path],
    split: str,
) -> None:
    from celltune.report.html import Section, write_report

    shown = [f"{m}_mean" for m in HEADLINE] + [f"{m}_sd" for m in HEADLINE]
    sections = [
        Section(
            "Benchmark", text=[result["notes"], f"{len(result['seeds'])} split seeds, {split}."]
        ),
        Section("Mean ± sd over seeds", tables=[table[sorted(shown)].round(4)]),
        Section("Paired vs best baseline", tables=[paired.set_index("metric").round(4)]),
    ]
    if images:
        sections.append(Section("Plots", images=images, captions=["every seed (dots), mean"]))
    write_report(out / "report.html", "celltune perturb benchmark", sections, meta=str(out))
