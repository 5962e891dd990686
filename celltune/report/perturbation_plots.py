"""Perturbation plots: top-20 DE boxplots with predictions marked, and delta scatters.

The boxplot follows scGPT's perturbation tutorial: for one perturbation, a box per DE gene
of the true per-cell change vs the control mean, with each method's predicted mean change
drawn on top, so a prediction that misses the direction or size of a change is obvious.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from celltune.errors import InputError
from celltune.files import atomic_path

logger = logging.getLogger(__name__)

_MARKERS = ("o", "D", "s", "^", "v", "P", "X")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _pyplot().close(fig)
    return path


def plot_de_boxplot(
    condition: str,
    true_cells: np.ndarray,
    ctrl_mean: np.ndarray,
    de_idx: Sequence[int],
    gene_names: Sequence[str],
    predictions: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    dpi: int = 110,
) -> Path:
    """Boxes: true change (cells − control mean) per DE gene; markers: predicted mean change."""
    plt = _pyplot()
    de = np.asarray(de_idx, dtype=np.int64)
    if de.size == 0:
        raise InputError(f"no DE genes for {condition!r}: run `celltune perturb prepare` first")
    cells = np.atleast_2d(np.asarray(true_cells, dtype=np.float64))
    C = np.asarray(ctrl_mean, dtype=np.float64).ravel()
    change = cells[:, de] - C[de]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * de.size + 2), 4.0))
    ax.boxplot([change[:, j] for j in range(de.size)], showfliers=False, widths=0.6)
    ax.axhline(0, color="0.6", lw=0.8, ls="--")
    x = np.arange(1, de.size + 1)
    for i, (method, pred) in enumerate(predictions.items()):
        p = np.asarray(pred, dtype=np.float64).ravel()
        ax.scatter(
            x, p[de] - C[de], marker=_MARKERS[i % len(_MARKERS)], s=28, zorder=3, label=method
        )
    ax.set_xticks(x, [str(gene_names[j]) for j in de], rotation=90, fontsize=8)
    ax.set_ylabel("change vs control (log1p)")
    ax.set_title(f"{condition}: top {de.size} DE genes")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_delta_scatter(
    conditions: Sequence[str],
    true_means: Mapping[str, np.ndarray],
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    ctrl_mean: np.ndarray,
    path: str | Path,
    *,
    de_idx: Mapping[str, Sequence[int]] | None = None,
    dpi: int = 110,
) -> Path:
    """One panel per method: predicted vs true mean change of every gene of ``conditions``.

    DE genes (when ``de_idx`` is given) are drawn in colour on top of the grey rest; each
    panel title carries Pearson r over all points.
    """
    from celltune.eval.perturbation import pearson

    plt = _pyplot()
    if not conditions or not predictions:
        raise InputError("nothing to plot: pass at least one condition and one method")
    C = np.asarray(ctrl_mean, dtype=np.float64).ravel()
    n = len(predictions)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    for ax, (method, preds) in zip(axes[0], predictions.items(), strict=True):
        t_all, p_all, t_de, p_de = [], [], [], []
        for c in conditions:
            t = np.asarray(true_means[c], dtype=np.float64).ravel() - C
            p = np.asarray(preds[c], dtype=np.float64).ravel() - C
            t_all.append(t)
            p_all.append(p)
            if de_idx is not None and c in de_idx:
                d = np.asarray(de_idx[c], dtype=np.int64)
                t_de.append(t[d])
                p_de.append(p[d])
        t_cat, p_cat = np.concatenate(t_all), np.concatenate(p_all)
        ax.scatter(t_cat, p_cat, s=3, c="0.7", linewidths=0, rasterized=True, label="all genes")
        if t_de:
            ax.scatter(
                np.concatenate(t_de),
                np.concatenate(p_de),
                s=8,
                c="C3",
                linewidths=0,
                label="top-20 DE",
            )
        lim = float(np.nanmax(np.abs(np.concatenate([t_cat, p_cat])))) or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="0.3", lw=0.7, ls="--")
        ax.set_xlim(-lim * 1.05, lim * 1.05)
        ax.set_ylim(-lim * 1.05, lim * 1.05)
        ax.set_title(f"{method} (r = {pearson(p_cat, t_cat):.2f})", fontsize=9)
        ax.set_xlabel("true change")
    axes[0][0].set_ylabel("predicted change")
    axes[0][0].legend(fontsize=7, frameon=False, loc="upper left")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_delta_similarity(
    conditions: list[str],
    true_means: dict[str, Any],
    predictions: dict[str, dict[str, Any]],
    ctrl_mean: Any,
    path: Path,
) -> Path:
    """Pairwise Pearson of the changes vs control between perturbations: truth next to
    each method. A model that predicts one average change for everything (scGPT issue
    #277) shows a uniformly red matrix where the truth does not."""
    plt = _pyplot()
    C = np.asarray(ctrl_mean, dtype=np.float64)
    panels = {"truth": true_means, **predictions}
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels) + 0.8, 3.2), squeeze=False)
    im = None
    for ax, (name, means) in zip(axes[0], panels.items(), strict=True):
        D = np.stack([np.asarray(means[c], dtype=np.float64) - C for c in conditions])
        Dc = D - D.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(Dc, axis=1)
        Dn = Dc / np.where(norm > 0, norm, 1.0)[:, None]
        R = Dn @ Dn.T
        off = ~np.eye(len(conditions), dtype=bool)
        mean_r = float(R[off].mean()) if len(conditions) > 1 else float("nan")
        im = ax.imshow(R, vmin=-1, vmax=1, cmap="RdBu_r")
        labels = [c.replace("+ctrl", "") for c in conditions]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [], fontsize=7)
        ax.set_title(f"{name}\nmean pairwise r = {mean_r:.2f}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="r of changes vs control")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
