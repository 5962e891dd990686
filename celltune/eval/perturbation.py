"""Perturbation-prediction metrics with GEARS / scGPT definitions.

Definitions (``shared/docs/perturbation.md``; GEARS ``gears/inference.py``: ``evaluate``,
``compute_metrics``, ``non_dropout_analysis``): with ``P`` the mean predicted expression of
a perturbation, ``T`` the mean of its true cells, ``C`` the mean of all control cells and
``D`` its top-20 DE genes,

- ``pearson`` = r(P, T); ``pearson_de`` = r(P[D], T[D]);
- ``pearson_delta`` = r(P − C, T − C); ``pearson_de_delta`` = r(P[D] − C[D], T[D] − C[D]);
- ``mse`` = mean((P − T)²); ``mse_de`` on D;
- on ``top_non_dropout_de_20`` (suffix ``_top20_de_non_dropout``) and ``top_non_zero_de_20``
  (suffix ``_top20_de_non_zero``): pearson, pearson_delta, mse, ``frac_correct_direction``
  (sign(P − C) == sign(T − C)), ``frac_in_range`` (P within the true cells' [min, max]),
  ``frac_in_range_25_75`` / ``frac_in_range_45_55`` (within those quantiles of the true
  cells) and ``mean_sigma`` = mean |P − T| / σ (σ = std of the true cells; genes with σ = 0
  left out).

A NaN correlation (a constant vector) counts as 0, as in GEARS. Averages are plain means
over perturbations, overall and per test subgroup (``unseen_single``, ``combo_seen0/1/2``).

Beyond GEARS, :func:`delta_similarity` reports how alike the predicted changes of
different perturbations are, next to the same figure for the truth, and
``pearson_delta_centered`` = r(P − P̄, T − T̄) (P̄, T̄: means over the evaluated
perturbations). A model that predicts one average change for every perturbation
(scGPT issue #277) has a predicted-delta similarity near 1 and a centred Pearson of 0,
however good its plain ``pearson_delta`` looks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from celltune.errors import InputError
from celltune.eval.vectors import mse, pearson

logger = logging.getLogger(__name__)

SUBGROUPS = ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2")
ArrayLike = Any


def _gene_set_metrics(
    suffix: str, P: np.ndarray, true: np.ndarray, T: np.ndarray, C: np.ndarray, idx: np.ndarray
) -> dict[str, float]:
    """GEARS' non-dropout analysis on one gene set (top-20 non-dropout or non-zero DE)."""
    if idx.size == 0:
        return {}
    p, t, c, cells = P[idx], T[idx], C[idx], true[:, idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = cells.std(axis=0)
        ok = sigma > 0
        mean_sigma = float(np.mean(np.abs(p - t)[ok] / sigma[ok])) if ok.any() else float("nan")
    q = np.quantile(cells, [0.25, 0.75, 0.45, 0.55], axis=0)
    return {
        f"pearson_{suffix}": pearson(p, t),
        f"pearson_delta_{suffix}": pearson(p - c, t - c),
        f"mse_{suffix}": mse(p, t),
        f"frac_correct_direction_{suffix}": float(np.mean(np.sign(p - c) == np.sign(t - c))),
        f"frac_in_range_{suffix}": float(
            np.mean((p >= cells.min(axis=0)) & (p <= cells.max(axis=0)))
        ),
        f"frac_in_range_25_75_{suffix}": float(np.mean((p >= q[0]) & (p <= q[1]))),
        f"frac_in_range_45_55_{suffix}": float(np.mean((p >= q[2]) & (p <= q[3]))),
        f"mean_sigma_{suffix}": mean_sigma,
    }


def perturbation_metrics(
    pred: ArrayLike,
    true_cells: ArrayLike,
    ctrl_mean: ArrayLike,
    de_idx: ArrayLike,
    non_dropout_idx: ArrayLike | None = None,
    non_zero_idx: ArrayLike | None = None,
) -> dict[str, float]:
    """All GEARS metrics of one perturbation: ``pred`` (genes,), ``true_cells`` (cells × genes)."""
    P = np.asarray(pred, dtype=np.float64).ravel()
    true = np.atleast_2d(np.asarray(true_cells, dtype=np.float64))
    C = np.asarray(ctrl_mean, dtype=np.float64).ravel()
    if true.shape[1] != P.size or C.size != P.size:
        raise InputError(
            f"shape mismatch: prediction has {P.size} genes, true cells {true.shape[1]}, "
            f"control mean {C.size}; pass all three on the same gene list"
        )
    T = true.mean(axis=0)
    D = np.asarray(de_idx, dtype=np.int64).ravel()
    out = {
        "pearson": pearson(P, T),
        "pearson_de": pearson(P[D], T[D]) if D.size else float("nan"),
        "pearson_delta": pearson(P - C, T - C),
        "pearson_de_delta": pearson(P[D] - C[D], T[D] - C[D]) if D.size else float("nan"),
        "mse": mse(P, T),
        "mse_de": mse(P[D], T[D]) if D.size else float("nan"),
        "n_cells": float(true.shape[0]),
    }
    if non_dropout_idx is not None:
        nd = np.asarray(non_dropout_idx, dtype=np.int64).ravel()
        out.update(_gene_set_metrics("top20_de_non_dropout", P, true, T, C, nd))
    if non_zero_idx is not None:
        nz = np.asarray(non_zero_idx, dtype=np.int64).ravel()
        out.update(_gene_set_metrics("top20_de_non_zero", P, true, T, C, nz))
    return out


def _pairwise_mean_r(M: np.ndarray) -> float:
    """Mean off-diagonal Pearson r between the rows of M (constant rows count as r = 0)."""
    if M.shape[0] < 2:
        return float("nan")
    Mc = M - M.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(Mc, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    R = (Mc / safe[:, None]) @ (Mc / safe[:, None]).T
    R[norms == 0, :] = 0.0
    R[:, norms == 0] = 0.0
    off = ~np.eye(M.shape[0], dtype=bool)
    return float(R[off].mean())


def delta_similarity(
    pred_means: Mapping[str, ArrayLike],
    true_means: Mapping[str, ArrayLike],
    ctrl_mean: ArrayLike,
    gene_idx: ArrayLike | None = None,
) -> dict[str, float]:
    """How alike the perturbations' predicted changes are, vs the same for the truth.

    Returns ``pred_delta_pairwise_pearson`` and ``true_delta_pairwise_pearson`` (mean
    Pearson over all pairs of perturbations of their changes vs control), their
    difference, and the mean norm of the per-perturbation deviation from the average
    change (predicted and true): a collapsed model has deviations near 0.
    """
    conds = [c for c in pred_means if c in true_means]
    C = np.asarray(ctrl_mean, dtype=np.float64).ravel()
    g = slice(None) if gene_idx is None else np.asarray(gene_idx, dtype=np.int64)
    Pd = np.stack([np.asarray(pred_means[c], dtype=np.float64).ravel() - C for c in conds])[:, g]
    Td = np.stack([np.asarray(true_means[c], dtype=np.float64).ravel() - C for c in conds])[:, g]
    p_r, t_r = _pairwise_mean_r(Pd), _pairwise_mean_r(Td)
    return {
        "n_perturbations": float(len(conds)),
        "pred_delta_pairwise_pearson": p_r,
        "true_delta_pairwise_pearson": t_r,
        "pairwise_pearson_excess": p_r - t_r,
        "pred_delta_spread": float(np.linalg.norm(Pd - Pd.mean(0), axis=1).mean()),
        "true_delta_spread": float(np.linalg.norm(Td - Td.mean(0), axis=1).mean()),
    }


def assign_subgroups(
    test_conditions: Sequence[str], train_conditions: Sequence[str]
) -> dict[str, list[str]]:
    """GEARS test subgroups from which genes were seen as training single perturbations.

    ``unseen_single``: a single whose gene has no training single; ``combo_seenK``: a
    combination with K of its two genes seen. Singles whose gene *was* seen (possible in
    random splits) go to ``seen_single``.
    """
    seen = set()
    for c in train_conditions:
        genes = [g for g in str(c).split("+") if g != "ctrl"]
        if len(genes) == 1:
            seen.add(genes[0])
    groups: dict[str, list[str]] = {k: [] for k in (*SUBGROUPS, "seen_single")}
    for c in test_conditions:
        genes = [g for g in str(c).split("+") if g != "ctrl"]
        if not genes:
            continue
        k = sum(g in seen for g in genes)
        if len(genes) == 1:
            groups["seen_single" if k else "unseen_single"].append(c)
        else:
            groups[f"combo_seen{min(k, 2)}"].append(c)
    return {k: v for k, v in groups.items() if v}


def _deviation(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """x − mean, with pure round-off (identical vectors) set to exactly 0."""
    d = x - mean
    return np.zeros_like(d) if np.linalg.norm(d) <= 1e-9 * np.linalg.norm(x) else d


def evaluate_predictions(
    pred_means: Mapping[str, ArrayLike],
    true_cells: Mapping[str, ArrayLike],
    ctrl_mean: ArrayLike,
    de_idx: Mapping[str, ArrayLike],
    non_dropout_idx: Mapping[str, ArrayLike] | None = None,
    non_zero_idx: Mapping[str, ArrayLike] | None = None,
    subgroups: Mapping[str, Sequence[str]] | None = None,
    pert_mean: ArrayLike | None = None,
    target_idx: Mapping[str, Sequence[int]] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-perturbation metrics and their averages (overall, per subgroup, similarity).

    Every mapping is keyed by condition (e.g. ``"FEV+ctrl"``); conditions missing from
    ``pred_means`` are an error (a silently smaller test set would flatter the model).
    Returns ``(per_pert, summary)``: ``per_pert`` has one row per condition (index) with
    a ``subgroup`` column; ``summary`` = ``{"all": {metric: mean}, "subgroups": {name:
    {metric: mean, "n_perturbations": n}}, "delta_similarity": {...}}``. With
    ``pert_mean`` (mean of the training perturbations' profiles) the metrics of
    :mod:`celltune.eval.perturbation_discrimination` are added (``target_idx``: columns of
    each condition's perturbed genes, left out of the discrimination distance).
    """
    conds = [c for c in true_cells if c != "ctrl"]
    if not conds:
        raise InputError("no test perturbations to evaluate: check the split")
    missing = [c for c in conds if c not in pred_means]
    if missing:
        raise InputError(
            f"no prediction for {len(missing)} test condition(s), e.g. {missing[:3]}: "
            "predict every test perturbation"
        )
    no_de = [c for c in conds if c not in de_idx]
    if no_de:
        raise InputError(
            f"no DE genes for {len(no_de)} condition(s), e.g. {no_de[:3]}: run "
            "`celltune perturb prepare` to compute them"
        )
    group_of = {c: g for g, members in (subgroups or {}).items() for c in members}
    C = np.asarray(ctrl_mean, dtype=np.float64).ravel()
    rows = {}
    for c in conds:
        rows[c] = perturbation_metrics(
            pred_means[c],
            true_cells[c],
            C,
            de_idx[c],
            None if non_dropout_idx is None else non_dropout_idx.get(c),
            None if non_zero_idx is None else non_zero_idx.get(c),
        )
    per = pd.DataFrame.from_dict(rows, orient="index")
    per.index.name = "condition"
    true_means = {c: np.asarray(true_cells[c], dtype=np.float64).mean(axis=0) for c in conds}
    preds = {c: np.asarray(pred_means[c], dtype=np.float64).ravel() for c in conds}
    # Centred change: each perturbation's deviation from the average over perturbations.
    P_bar = np.mean([preds[c] for c in conds], axis=0)
    T_bar = np.mean([true_means[c] for c in conds], axis=0)
    per["pearson_delta_centered"] = [
        pearson(_deviation(preds[c], P_bar), _deviation(true_means[c], T_bar)) for c in conds
    ]
    if pert_mean is not None:
        from celltune.eval.perturbation_discrimination import score_current

        extra = score_current(preds, true_means, C, pert_mean, de_idx, target_idx)
        for k in next(iter(extra.values())):
            per[k] = [extra[c][k] for c in conds]
    per.insert(0, "subgroup", [group_of.get(c, "") for c in conds])

    metric_cols = [k for k in per.columns if k not in ("subgroup", "n_cells")]
    summary: dict[str, Any] = {
        "all": {k: float(per[k].mean()) for k in metric_cols} | {"n_perturbations": len(conds)},
        "subgroups": {},
        "delta_similarity": delta_similarity(preds, true_means, C),
    }
    for g in (*SUBGROUPS, "seen_single"):
        sub = per[per["subgroup"] == g]
        if len(sub):
            summary["subgroups"][g] = {k: float(sub[k].mean()) for k in metric_cols} | {
                "n_perturbations": len(sub)
            }
    return per, summary


def summary_table(
    summaries: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]
) -> pd.DataFrame:
    """Rows = (method, subgroup) incl. ``all``; columns = ``metrics``: the README table."""
    rows = []
    for method, s in summaries.items():
        groups = {"all": s["all"], **s.get("subgroups", {})}
        for g, vals in groups.items():
            row = {"method": method, "subgroup": g, "n": vals.get("n_perturbations")}
            row.update({m: vals.get(m, float("nan")) for m in metrics})
            rows.append(row)
    return pd.DataFrame(rows)


def _uns_gene_lists(adata: Any, key: str) -> dict[str, Any] | None:
    value = adata.uns.get(key)
    return dict(value) if value is not None else None


def _gene_positions(adata: Any, genes: Sequence[str]) -> np.ndarray:
    """Column indices of gene ids (var index) or, failing that, of ``var['gene_name']``."""
    by_id = {g: i for i, g in enumerate(map(str, adata.var_names))}
    by_name = (
        {g: i for i, g in enumerate(adata.var["gene_name"].astype(str))}
        if "gene_name" in adata.var.columns
        else {}
    )
    pos = [by_id.get(str(g), by_name.get(str(g), -1)) for g in genes]
    return np.asarray([p for p in pos if p >= 0], dtype=np.int64)


def eval_inputs_from_adata(
    adata: Any,
    *,
    split: str = "test",
    split_key: str = "split",
    condition_key: str = "condition",
    de_key: str = "top_non_dropout_de_20",
    non_zero_key: str = "top_non_zero_de_20",
) -> dict[str, Any]:
    """Everything :func:`evaluate_predictions` needs, read from a GEARS-format AnnData.

    ``uns[de_key]`` may be keyed by ``condition_name`` (GEARS) or by condition, with gene
    ids or gene names. Returns a dict with ``true_cells``, ``ctrl_mean``, ``de_idx``,
    ``non_dropout_idx``, ``non_zero_idx``, ``subgroups`` (computed from the train split),
    ``target_idx`` (columns of each condition's perturbed genes) and ``pert_mean`` (mean
    of the training perturbations' mean profiles, None without training perturbations).
    """
    import scipy.sparse as sp

    for key in (condition_key, split_key):
        if key not in adata.obs.columns:
            raise InputError(
                f"obs column {key!r} is missing: run `celltune perturb prepare` to write "
                "GEARS-format data with splits"
            )
    de_lists = _uns_gene_lists(adata, de_key)
    if de_lists is None:
        raise InputError(
            f"uns[{de_key!r}] is missing: run `celltune perturb prepare` to compute DE genes"
        )
    nz_lists = _uns_gene_lists(adata, non_zero_key)
    cond = adata.obs[condition_key].astype(str).to_numpy()
    spl = adata.obs[split_key].astype(str).to_numpy()
    names = (
        adata.obs["condition_name"].astype(str).to_numpy()
        if "condition_name" in adata.obs.columns
        else cond
    )
    name_of = dict(zip(cond, names, strict=True))
    ctrl = cond == "ctrl"
    if not ctrl.any():
        raise InputError("no control cells (condition 'ctrl'): include the control cells")
    ctrl_mean = np.asarray(adata.X[ctrl].mean(axis=0), dtype=np.float64).ravel()
    test = sorted({c for c, s in zip(cond, spl, strict=True) if s == split and c != "ctrl"})
    if not test:
        raise InputError(f"no perturbations in split {split!r}: re-split the data")
    train = sorted({c for c, s in zip(cond, spl, strict=True) if s == "train" and c != "ctrl"})

    def lookup(lists: dict[str, Any] | None, c: str) -> np.ndarray | None:
        if lists is None:
            return None
        genes = lists.get(name_of[c], lists.get(c))
        return None if genes is None else _gene_positions(adata, list(genes))

    true_cells, de_idx, nd_idx, nz_idx, target_idx = {}, {}, {}, {}, {}
    for c in test:
        target_idx[c] = _gene_positions(adata, [g for g in c.split("+") if g != "ctrl"])
        sub = adata.X[cond == c]
        true_cells[c] = np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float32)
        d = lookup(de_lists, c)
        if d is None:
            raise InputError(f"uns[{de_key!r}] has no entry for {c!r}: re-run prepare")
        de_idx[c] = nd_idx[c] = d
        z = lookup(nz_lists, c)
        if z is not None:
            nz_idx[c] = z
    return {
        "true_cells": true_cells,
        "ctrl_mean": ctrl_mean,
        "de_idx": de_idx,
        "non_dropout_idx": nd_idx,
        "non_zero_idx": nz_idx or None,
        "subgroups": assign_subgroups(test, train),
        "target_idx": target_idx,
        "pert_mean": _perturbation_mean(adata.X, cond, train),
    }


def _perturbation_mean(X: Any, cond: np.ndarray, train: Sequence[str]) -> np.ndarray | None:
    """Mean over training perturbations of their mean profile (Systema's reference)."""
    if not train:
        return None
    means = [np.asarray(X[cond == c].mean(axis=0), dtype=np.float64).ravel() for c in train]
    return np.mean(means, axis=0)
