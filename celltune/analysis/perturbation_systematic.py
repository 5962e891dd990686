"""Can Pearson-delta tell models apart on this data? Systematic variation and its ceiling.

Systema (Viñas Torné et al. 2025) showed that much of each perturbation's change vs
control is shared by all perturbations (selection, stress, cell-cycle effects of the
screen itself). A predictor of that shared change (Train Mean) then scores a high
Pearson-delta without knowing anything about the perturbation. Before training, this
module measures per perturbation:

- ``systematic_r``: Pearson r of its delta (mean − control mean) with the average delta
  of the *other* perturbations (leave-one-out, so that with few perturbations a delta
  does not correlate with itself);
- ``split_half_pearson_delta``: r(A − C, B − C) for two random halves A, B of its cells,
  i.e. the Pearson-delta a perfect model could reach given the cell-to-cell noise;
- ``split_half_pearson_delta_pert_mean``: the same with deltas against the mean
  perturbation profile M instead of control (Systema's reference; Train Mean scores 0).

When ``systematic_r`` is close to ``split_half_pearson_delta`` the shared change alone
reaches the ceiling, so Pearson-delta cannot separate a model from Train Mean; the
perturbation-mean deltas and the discrimination score
(:mod:`celltune.eval.perturbation_discrimination`) are the figures to compare on.
Input: log-normalised cells × genes, control in group 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp


def _r(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    d = np.linalg.norm(xc) * np.linalg.norm(yc)
    return float(xc @ yc / d) if d > 0 else float("nan")


def systematic_variation(
    X: Any, codes: np.ndarray, groups: Sequence[str], seed: int = 0
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-perturbation table (column ``perturbation``) and a summary with a reading."""
    from celltune.analysis.perturbation_groups import group_moments
    from celltune.analysis.perturbation_pass import half_labels

    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    codes = np.asarray(codes, dtype=np.int64)
    n_groups = len(groups)
    _, sums, _ = group_moments(X, codes, n_groups, values=True)
    half = half_labels(codes, n_groups, seed)
    keep = half >= 0
    hc = 2 * codes[keep] + half[keep]
    _, h_sums, _ = group_moments(X[keep], hc, 2 * n_groups, values=True)
    n = np.bincount(codes, minlength=n_groups).astype(np.float64)
    h_n = np.bincount(hc, minlength=2 * n_groups).astype(np.float64)
    return systematic_from_sums(sums, n, h_sums, h_n, groups)


def systematic_from_sums(
    sums: np.ndarray,
    n_cells: np.ndarray,
    half_sums: np.ndarray,
    half_n: np.ndarray,
    groups: Sequence[str],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`systematic_variation` from per-group sums and per-(group, half) sums (row
    ``2 g + h``; halves from ``perturbation_pass.half_labels``), as a chunked pass gives."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / n_cells[:, None]
        h_means = half_sums / half_n[:, None]
    ctrl = means[0]
    perts = list(groups[1:])
    deltas = means[1:] - ctrl
    M = means[1:].mean(axis=0)
    rows = []
    for i, p in enumerate(perts):
        others = np.delete(deltas, i, axis=0)
        row = {
            "perturbation": p,
            "systematic_r": _r(deltas[i], others.mean(axis=0)) if len(others) else np.nan,
            "split_half_pearson_delta": np.nan,
            "split_half_pearson_delta_pert_mean": np.nan,
        }
        if half_n[2 * (i + 1)] > 0 and half_n[2 * (i + 1) + 1] > 0:
            a, b = h_means[2 * (i + 1)], h_means[2 * (i + 1) + 1]
            row["split_half_pearson_delta"] = _r(a - ctrl, b - ctrl)
            row["split_half_pearson_delta_pert_mean"] = _r(a - M, b - M)
        rows.append(row)
    table = pd.DataFrame(rows)
    med = {k: float(table[k].median()) for k in table.columns if k != "perturbation"}
    gap = med["split_half_pearson_delta"] - med["systematic_r"]
    if not np.isfinite(gap):
        reading = "systematic variation: too few perturbations or cells to measure it."
    else:
        verdict = (
            "the shared change alone comes close to the ceiling, so Pearson-delta can hardly "
            "tell a model from Train Mean here; compare on deltas vs the perturbation mean "
            "and the discrimination score"
            if gap < 0.1
            else "Pearson-delta leaves room above the shared change"
        )
        reading = (
            f"systematic variation: each perturbation's change correlates with the average "
            f"change of the others at median r = {med['systematic_r']:.2f}; the split-half "
            f"ceiling of Pearson-delta is {med['split_half_pearson_delta']:.2f} (vs the "
            f"perturbation mean: {med['split_half_pearson_delta_pert_mean']:.2f}); {verdict}."
        )
    summary = {"median": med, "n_perturbations": len(perts), "reading": reading}
    return table, summary
