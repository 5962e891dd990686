"""Plots of ``celltune stats`` (matplotlib, Agg): one PNG per question of issue 6."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from celltune.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from celltune.analysis.perturbation_stats import PerturbationStats


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _figure(w: float = 5.5, h: float = 4.0) -> tuple[Figure, object]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def plot_zero_fractions(result: PerturbationStats, path: Path) -> Path:
    """Histogram of per-gene zero fractions in control vs perturbed cells."""
    g = result.per_gene
    fig, ax = _figure()
    bins = np.linspace(0, 1, 41)
    ax.hist(g["zero_fraction_ctrl"], bins=bins, alpha=0.6, label="control")
    ax.hist(g["zero_fraction_perturbed"].dropna(), bins=bins, alpha=0.6, label="perturbed")
    ax.set_xlabel("fraction of cells with zero value (per gene)")
    ax.set_ylabel("genes")
    ax.legend()
    return _save(fig, path)


def plot_n_significant(result: PerturbationStats, path: Path) -> Path:
    """Number of significant genes per perturbation, one bar group per DE method."""
    p = result.per_perturbation
    cols = [c for c in p.columns if c.startswith("n_significant_")]
    t = p[p["tested"]].sort_values(cols[0], ascending=False) if cols else p
    fig, ax = _figure(max(5.5, 0.22 * len(t) + 2), 4.0)
    x = np.arange(len(t))
    w = 0.8 / max(len(cols), 1)
    for i, c in enumerate(cols):
        ax.bar(
            x + i * w, t[c].to_numpy(dtype=float), width=w, label=c.removeprefix("n_significant_")
        )
    ax.set_xticks(x + w * (len(cols) - 1) / 2)
    ax.set_xticklabels(t["perturbation"], rotation=90, fontsize=7)
    ax.set_ylabel("significant genes")
    ax.legend()
    return _save(fig, path)


def plot_effect_vs_ctrl_sd(result: PerturbationStats, path: Path) -> Path:
    """|Mean change| of each top-20 DE gene against its SD in control cells."""
    t = result.top_de
    fig, ax = _figure()
    x = t["ctrl_sd"].to_numpy(dtype=float)
    y = np.abs(t["effect"].to_numpy(dtype=float))
    ok = (x > 0) & (y > 0)
    ax.scatter(x[ok], y[ok], s=6, alpha=0.5)
    if ok.any():
        lo, hi = min(x[ok].min(), y[ok].min()), max(x[ok].max(), y[ok].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="change = 1 control SD")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("SD in control cells (log-normalised)")
    ax.set_ylabel("|mean change vs control|")
    return _save(fig, path)


def plot_variance_fraction(result: PerturbationStats, path: Path) -> Path:
    """Histogram of the per-gene fraction of variance between perturbation groups."""
    fig, ax = _figure()
    v = result.per_gene["frac_between"].dropna().to_numpy()
    ax.hist(v, bins=40)
    ax.set_xlabel("fraction of variance between perturbation groups (per gene)")
    ax.set_ylabel("genes")
    return _save(fig, path)


def plot_mean_variance(result: PerturbationStats, path: Path, raw: bool) -> Path:
    """Per-gene mean vs variance in control cells, with the Poisson line for counts."""
    mv = result.ctrl_counts_mean_var
    fig, ax = _figure()
    ok = (mv["mean"] > 0) & (mv["var"] > 0)
    m, v = mv.loc[ok, "mean"].to_numpy(), mv.loc[ok, "var"].to_numpy()
    ax.scatter(m, v, s=6, alpha=0.5)
    if ok.any():
        grid = np.geomspace(m.min(), m.max(), 50)
        if raw:
            ax.plot(grid, grid, "k--", lw=1, label="Poisson (var = mean)")
            phi = result.summary["mean_variance"]["median_overdispersion_phi"]
            if phi is not None and phi > 0:
                ax.plot(grid, grid + phi * grid**2, "r-", lw=1, label=f"NB, φ = {phi:.2f}")
            ax.legend()
        ax.set_xscale("log")
        ax.set_yscale("log")
    unit = "counts" if raw else "given values"
    ax.set_xlabel(f"mean in control cells ({unit})")
    ax.set_ylabel("variance in control cells")
    return _save(fig, path)


def plot_all(result: PerturbationStats, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write every stats plot into ``out_dir``; returns name → path."""
    out = Path(out_dir)
    raw = result.summary["input_assumed"] == "raw counts"
    figs = {
        "zero_fraction_hist.png": plot_zero_fractions(result, out / "zero_fraction_hist.png"),
        "variance_fraction.png": plot_variance_fraction(result, out / "variance_fraction.png"),
        "mean_variance.png": plot_mean_variance(result, out / "mean_variance.png", raw),
    }
    if any(c.startswith("n_significant_") for c in result.per_perturbation.columns):
        figs["n_significant.png"] = plot_n_significant(result, out / "n_significant.png")
    if len(result.top_de):
        figs["effect_vs_ctrl_sd.png"] = plot_effect_vs_ctrl_sd(
            result, out / "effect_vs_ctrl_sd.png"
        )
    return figs
