"""Split-half noise ceiling: how well the data predict themselves.

Each test perturbation's real cells are split at random into two halves; the mean of one
half is scored as if it were a prediction against the other half's cells, with the same
metrics as every method (:func:`celltune.eval.perturbation.evaluate_predictions`). No
model can be expected to beat this on average: it is what the cell-to-cell noise of the
data leaves measurable. Two caveats, both stated in every table that shows it:

- the truth is half the cells, so the ceiling is slightly pessimistic (a noisier target);
- a perturbation with fewer than ``min_cells`` cells (default 2, one per half) has no
  ceiling; it is left out and counted in ``n_without_ceiling``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from celltune.eval.perturbation import evaluate_predictions

CEILING_NAME = "noise_ceiling"


def split_halves(
    true_cells: Mapping[str, Any], seed: int = 0, min_cells: int = 2
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """``(first-half means, second-half cells, conditions too small)``, seeded per run."""
    rng = np.random.default_rng([seed, 71])
    first, second, small = {}, {}, []
    for c in sorted(true_cells):
        cells = np.atleast_2d(np.asarray(true_cells[c], dtype=np.float64))
        if cells.shape[0] < max(2, min_cells):
            small.append(c)
            continue
        order = rng.permutation(cells.shape[0])
        half = cells.shape[0] // 2
        first[c] = cells[order[:half]].mean(axis=0)
        second[c] = cells[order[half:]]
    return first, second, small


def noise_ceiling(
    true_cells: Mapping[str, Any],
    ctrl_mean: Any,
    de_idx: Mapping[str, Any],
    *,
    non_dropout_idx: Mapping[str, Any] | None = None,
    non_zero_idx: Mapping[str, Any] | None = None,
    subgroups: Mapping[str, Sequence[str]] | None = None,
    pert_mean: Any = None,
    target_idx: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    min_cells: int = 2,
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """Per-perturbation metrics and summary of half vs half; None when no condition fits."""
    first, second, small = split_halves(true_cells, seed, min_cells)
    if not first:
        return None
    keep = set(first)
    groups = {g: [c for c in m if c in keep] for g, m in (subgroups or {}).items()}
    per, summary = evaluate_predictions(
        first,
        second,
        ctrl_mean,
        {c: v for c, v in de_idx.items() if c in keep},
        None if non_dropout_idx is None else {c: non_dropout_idx[c] for c in keep},
        None if non_zero_idx is None else {c: v for c, v in non_zero_idx.items() if c in keep},
        {g: m for g, m in groups.items() if m},
        pert_mean=pert_mean,
        target_idx=target_idx,
    )
    summary["n_without_ceiling"] = len(small)
    summary["without_ceiling"] = small
    return per, summary
