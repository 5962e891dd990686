"""Perturbation metrics that a mean predictor cannot game (2024–2026 benchmarks).

The GEARS / scGPT metrics (:mod:`celltune.eval.perturbation`) reward predicting the average
change of all perturbations: Train Mean scores a high Pearson-delta because most of each
perturbation's change vs control is shared by every perturbation (Systema, Viñas Torné et
al. 2025). These metrics ask instead whether a prediction tells *this* perturbation apart
from the others. With ``P`` / ``T`` the predicted / true mean profile of a perturbation,
``C`` the mean of the real control cells, ``M`` the mean over the *training* perturbations'
mean profiles and ``D`` its true top-N DE genes (GEARS ranking, ``uns``):

- ``discrimination_l1``: rank of the true perturbation among all evaluated test
  perturbations by L1 distance between ``P`` and each true profile ``T'``, with the
  perturbation's own target gene(s) left out of the distance, normalised so 1 = the true
  profile is the nearest, 0 = the farthest (cell-eval's discrimination score, 1 − its
  normalised rank). One prediction for everything scores 0.5 on average.
- ``de_overlap_at_N``: fraction of ``D`` (first N) among the N genes with the largest
  predicted |P − C| (targets excluded); with both lists of length N it is also the
  precision at N.
- ``de_direction_agreement``: fraction of ``D`` with sign(P − C) = sign(T − C).
- ``mae``: mean |P − T| over all genes; ``mae_de`` on ``D``.
- ``pearson_delta_pert_mean`` = r(P − M, T − M) and ``pearson_de_delta_pert_mean`` on
  ``D`` (Systema: deltas against the perturbation mean, not control). Train Mean predicts
  ``M`` and scores 0.

Control cells: every metric here uses the mean of the *real* control cells of the data
(``C``); cell-eval instead uses the control cells inside the predicted file. ``M`` uses
only training perturbations, so no test information leaks into the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from celltune.errors import InputError
from celltune.eval.vectors import pearson

DE_N = (10, 20)


def _stack(means: Mapping[str, Any], conds: Sequence[str]) -> np.ndarray:
    return np.stack([np.asarray(means[c], dtype=np.float64).ravel() for c in conds])


def discrimination_scores(
    pred_means: Mapping[str, Any],
    true_means: Mapping[str, Any],
    target_idx: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, float]:
    """``{condition: 1 − normalised rank}`` of the true profile among all true profiles.

    Ties count half (so identical predictions score exactly 0.5 on average). Needs at
    least two perturbations; with one the score is NaN.
    """
    conds = [c for c in true_means if c in pred_means]
    n = len(conds)
    if n < 2:
        return {c: float("nan") for c in conds}
    P, T = _stack(pred_means, conds), _stack(true_means, conds)
    if P.shape != T.shape:
        raise InputError(f"predicted {P.shape} and true {T.shape} profiles differ in genes")
    out = {}
    for i, c in enumerate(conds):
        keep = np.ones(P.shape[1], dtype=bool)
        if target_idx is not None and c in target_idx:
            keep[np.asarray(target_idx[c], dtype=np.int64)] = False
        dist = np.abs(T[:, keep] - P[i, keep]).sum(axis=1)
        others = np.delete(dist, i)
        closer = np.sum(others < dist[i]) + 0.5 * np.sum(others == dist[i])
        out[c] = float(1.0 - closer / (n - 1))
    return out


def de_overlap(
    pred: np.ndarray, ctrl: np.ndarray, de_idx: np.ndarray, n: int, exclude: np.ndarray
) -> float:
    """Fraction of the first ``n`` true DE genes among the top-``n`` predicted |P − C|."""
    true_top = np.asarray(de_idx, dtype=np.int64)[:n]
    if true_top.size == 0:
        return float("nan")
    score = np.abs(pred - ctrl)
    score[np.asarray(exclude, dtype=np.int64)] = -np.inf
    k = min(true_top.size, score.size)
    pred_top = np.argsort(-score, kind="stable")[:k]
    return float(np.isin(true_top, pred_top).mean())


def current_metrics(
    pred: Any,
    true_mean: Any,
    ctrl_mean: Any,
    pert_mean: Any,
    de_idx: Any,
    target_idx: Any = (),
) -> dict[str, float]:
    """Every per-perturbation metric of the module docstring except discrimination."""
    P = np.asarray(pred, dtype=np.float64).ravel()
    T = np.asarray(true_mean, dtype=np.float64).ravel()
    C = np.asarray(ctrl_mean, dtype=np.float64).ravel()
    M = np.asarray(pert_mean, dtype=np.float64).ravel()
    if not P.size == T.size == C.size == M.size:
        raise InputError(
            f"shape mismatch: prediction {P.size}, truth {T.size}, control {C.size}, "
            f"perturbation mean {M.size} genes; pass all on the same gene list"
        )
    D = np.asarray(de_idx, dtype=np.int64).ravel()
    tgt = np.asarray(target_idx, dtype=np.int64).ravel()
    out = {
        "mae": float(np.mean(np.abs(P - T))),
        "mae_de": float(np.mean(np.abs(P[D] - T[D]))) if D.size else float("nan"),
        "de_direction_agreement": float(np.mean(np.sign(P[D] - C[D]) == np.sign(T[D] - C[D])))
        if D.size
        else float("nan"),
        "pearson_delta_pert_mean": pearson(P - M, T - M),
        "pearson_de_delta_pert_mean": pearson(P[D] - M[D], T[D] - M[D]) if D.size else float("nan"),
    }
    for n in DE_N:
        out[f"de_overlap_at_{n}"] = de_overlap(P, C, D, n, tgt)
    return out


CURRENT_METRICS = (
    "discrimination_l1",
    "de_overlap_at_10",
    "de_overlap_at_20",
    "de_direction_agreement",
    "mae",
    "mae_de",
    "pearson_delta_pert_mean",
    "pearson_de_delta_pert_mean",
)


def score_current(
    pred_means: Mapping[str, Any],
    true_means: Mapping[str, Any],
    ctrl_mean: Any,
    pert_mean: Any,
    de_idx: Mapping[str, Any],
    target_idx: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, dict[str, float]]:
    """``{condition: {metric: value}}`` of :data:`CURRENT_METRICS` over ``true_means``."""
    targets = dict(target_idx or {})
    disc = discrimination_scores(pred_means, true_means, targets)
    out = {}
    for c in true_means:
        row = current_metrics(
            pred_means[c], true_means[c], ctrl_mean, pert_mean, de_idx[c], targets.get(c, ())
        )
        out[c] = {"discrimination_l1": disc.get(c, float("nan")), **row}
    return out
