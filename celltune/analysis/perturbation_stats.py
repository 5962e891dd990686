"""What a perturbation dataset looks like before any model is trusted on it.

Answers the questions of issue 6 for any Perturb-seq AnnData with a condition column:
zeros (overall, per perturbation, per gene), significant changes against control
(scanpy ``rank_genes_groups``, BH-adjusted), the size of the top-20 DE changes relative
to the spread in control cells, whether the perturbed gene itself changes, and a per-gene
variance decomposition (within vs between perturbation groups) with the mean–variance
relationship.

Everything is computed from sparse per-group sums (an indicator matrix times ``X``), so
memory grows with the non-zeros plus a dense (groups × genes) table, never cells × genes.
Raw counts are normalised (total counts) + log1p before the DE tests and the variance
decomposition; the mean–variance / over-dispersion figures use the counts themselves.

``compute_perturbation_stats(adata, ...) -> PerturbationStats`` does the work (helpers in
``perturbation_groups``, the summary and readings in ``perturbation_summary``);
``celltune.report.stats_report.write_stats(result, out_dir)`` writes ``stats.json``, the two
CSV tables, the plots and ``report.html`` (analysis computes, report draws).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from celltune.analysis.perturbation_groups import (
    LOG,
    NORM,
    RAW,
    condition_targets,
    detect_input_kind,
    group_moments,
    log_normalise,
    rank_genes,
)
from celltune.analysis.perturbation_summary import report_sentences, summarise
from celltune.data.io import get_matrix
from celltune.errors import InputError

logger = logging.getLogger(__name__)

METHODS = ("wilcoxon", "t-test")


@dataclass
class PerturbationStats:
    """All figures of a stats run: a JSON-able summary and two tables."""

    summary: dict[str, Any]
    per_perturbation: pd.DataFrame
    per_gene: pd.DataFrame
    top_de: pd.DataFrame = field(default_factory=pd.DataFrame)
    ctrl_counts_mean_var: pd.DataFrame = field(default_factory=pd.DataFrame)


def compute_perturbation_stats(
    adata: AnnData,
    *,
    condition_key: str = "condition",
    control: str = "ctrl",
    layer: str | None = None,
    pval: float = 0.05,
    min_lfc: float = 0.0,
    methods: Sequence[str] = METHODS,
    n_top_de: int = 20,
    min_cells: int = 3,
) -> PerturbationStats:
    """Compute every figure of issue 6 (see the module docstring)."""
    methods = _check_arguments(adata, condition_key, pval, min_lfc, methods)
    X = get_matrix(adata, layer)
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    X.sum_duplicates()
    kind = detect_input_kind(X)
    logger.info("input assumed to be %s", kind)
    g = _groups(adata, condition_key, control)
    zeros = _zeros(X, g)
    # log-normalised values for DE and variance (one float32 copy at most)
    Xlog = log_normalise(X) if kind == RAW else X.astype(np.float32, copy=False)
    var = _variance(Xlog, g)
    c_mean, c_var, phi = _control_mean_variance(X, g)
    genes = pd.Index(adata.var_names.astype(str))
    symbols = (
        pd.Index(adata.var["gene_name"].astype(str)) if "gene_name" in adata.var.columns else genes
    )
    perts = list(g.cats[1:])
    tested = [p for p in perts if g.n_cells[g.cats.get_loc(p)] >= min_cells]
    if g.n_cells[0] < min_cells:
        raise InputError(
            f"only {int(g.n_cells[0])} control cell(s); DE tests need at least {min_cells}. "
            "Fix: check --control."
        )
    de: dict[str, pd.DataFrame] = {}
    for m in methods:
        if tested:
            logger.info("rank_genes_groups (%s) on %d perturbations", m, len(tested))
            de[m] = rank_genes(Xlog, g.cond, control, tested, m, genes)
    per_pert, top_rows = _per_perturbation(
        g, zeros, var, de, genes, symbols, tested, control, pval, min_lfc, methods, n_top_de
    )
    per_gene = _per_gene(genes, symbols, zeros, var, (c_mean, c_var, phi), de, pval, min_lfc)
    summary = summarise(
        per_pert=per_pert,
        per_gene=per_gene,
        kind=kind,
        methods=list(de),
        zero_ctrl=zeros["ctrl"],
        zero_pert=zeros["pert"],
        n_cells=g.n_cells,
        n_genes=X.shape[1],
        skipped=[p for p in perts if p not in tested],
        params={
            "condition_key": condition_key,
            "control": control,
            "layer": layer,
            "pval": pval,
            "min_lfc": min_lfc,
            "methods": list(methods),
            "n_top_de": n_top_de,
            "min_cells": min_cells,
        },
    )
    from celltune.analysis.perturbation_systematic import systematic_variation

    sys_table, summary["systematic_variation"] = systematic_variation(Xlog, g.codes, list(g.cats))
    per_pert = per_pert.merge(sys_table, on="perturbation", how="left")
    mv = pd.DataFrame({"mean": c_mean, "var": c_var})
    return PerturbationStats(summary, per_pert, per_gene, pd.DataFrame(top_rows), mv)


# ---------------------------------------------------------------- steps


def _check_arguments(
    adata: AnnData, condition_key: str, pval: float, min_lfc: float, methods: Sequence[str]
) -> list[str]:
    """The DE methods, stripped; ``InputError`` for a bad argument or a missing column."""
    methods = [m.strip() for m in methods if m.strip()]
    for m in methods:
        if m not in ("wilcoxon", "t-test", "t-test_overestim_var"):
            raise InputError(f"unknown DE method {m!r}. Fix: use wilcoxon and/or t-test.")
    if not 0 < pval <= 1:
        raise InputError(f"--pval must be in (0, 1], got {pval}. Fix: e.g. --pval 0.05.")
    if min_lfc < 0:
        raise InputError(f"--min-lfc must be >= 0, got {min_lfc}. Fix: e.g. --min-lfc 1.")
    if condition_key not in adata.obs.columns:
        raise InputError(
            f"obs column {condition_key!r} not found (columns: "
            f"{', '.join(map(str, adata.obs.columns))}). Fix: pass --condition-key."
        )
    return methods


@dataclass
class _Groups:
    """Conditions as group codes; group 0 is the control."""

    cond: pd.Series
    cats: pd.Index
    codes: np.ndarray
    n_cells: np.ndarray

    @property
    def n_groups(self) -> int:
        return len(self.cats)


def _groups(adata: AnnData, condition_key: str, control: str) -> _Groups:
    cond = adata.obs[condition_key].astype(str).reset_index(drop=True)
    if not (cond == control).any():
        found = ", ".join(repr(c) for c in pd.unique(cond)[:8])
        raise InputError(
            f"no control cells: no {condition_key!r} value equals {control!r} (values: {found}"
            "...). Fix: pass the control value with --control."
        )
    cats = pd.Index([control, *sorted(set(pd.unique(cond)) - {control})])
    codes = cats.get_indexer(cond)
    n_cells = np.bincount(codes, minlength=len(cats)).astype(np.float64)
    return _Groups(cond, cats, codes, n_cells)


def _zeros(X: sp.csr_matrix, g: _Groups) -> dict[str, Any]:
    """Zero fractions (the pattern is identical in counts and log data)."""
    n_genes = X.shape[1]
    nnz_g, _, _ = group_moments(X, g.codes, g.n_groups, values=False)
    n_cells = g.n_cells
    n_pert_cells = n_cells[1:].sum()
    return {
        "nnz_g": nnz_g,
        "ctrl_gene": (1 - nnz_g / n_cells[:, None])[0],
        "pert_gene": (
            1 - nnz_g[1:].sum(0) / n_pert_cells if n_pert_cells else np.full(n_genes, np.nan)
        ),
        "ctrl": float(1 - nnz_g[0].sum() / (n_cells[0] * n_genes)),
        "pert": float(1 - nnz_g[1:].sum() / (n_pert_cells * n_genes)) if n_pert_cells else np.nan,
        "all_zero_ctrl": nnz_g[0] == 0,
    }


def _variance(Xlog: sp.csr_matrix, g: _Groups) -> dict[str, np.ndarray]:
    """Group means and variances, and the within / between decomposition per gene."""
    n_cells = g.n_cells
    _, sums, sumsq = group_moments(Xlog, g.codes, g.n_groups, values=True)
    means = sums / n_cells[:, None]
    ss_within_g = np.maximum(sumsq - n_cells[:, None] * means**2, 0)
    var_g = ss_within_g / np.maximum(n_cells - 1, 1)[:, None]
    grand = sums.sum(0) / n_cells.sum()
    ss_total = np.maximum(sumsq.sum(0) - n_cells.sum() * grand**2, 0)
    ss_within = ss_within_g.sum(0)
    ss_between = (n_cells[:, None] * (means - grand) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac_between = np.where(ss_total > 0, ss_between / ss_total, np.nan)
        frac_within = np.where(ss_total > 0, ss_within / ss_total, np.nan)
    return {
        "means": means,
        "var_g": var_g,
        "ss_total": ss_total,
        "ss_within": ss_within,
        "ss_between": ss_between,
        "frac_between": frac_between,
        "frac_within": frac_within,
    }


def _control_mean_variance(
    X: sp.csr_matrix, g: _Groups
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance and NB over-dispersion in control cells (counts when raw)."""
    is_ctrl = g.codes == 0
    n_c = int(is_ctrl.sum())
    _, c_sum, c_sumsq = group_moments(X[is_ctrl], np.zeros(n_c, np.int64), 1, values=True)
    c_mean = c_sum[0] / n_c
    c_var = (c_sumsq[0] - n_c * c_mean**2) / max(n_c - 1, 1)
    c_var = np.maximum(c_var, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where(c_mean > 0, (c_var - c_mean) / c_mean**2, np.nan)
    return c_mean, c_var, phi


def _per_perturbation(
    g: _Groups,
    zeros: dict[str, Any],
    var: dict[str, np.ndarray],
    de: dict[str, pd.DataFrame],
    genes: pd.Index,
    symbols: pd.Index,
    tested: list[str],
    control: str,
    pval: float,
    min_lfc: float,
    methods: list[str],
    n_top_de: int,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One row per perturbation (zeros, DE counts, target gene, top-DE effect sizes)."""
    sym_to_idx = {s: i for i, s in enumerate(symbols)}
    sym_to_idx.update({gene: i for i, gene in enumerate(genes)})
    n_genes = len(genes)
    var_g = var["var_g"]
    rows = []
    top_rows: list[dict[str, Any]] = []
    ctrl_sd = np.sqrt(var_g[0])
    # top-20 DE effect sizes vs control spread (t-test ranking as GEARS, else first)
    rank_m = "t-test" if "t-test" in de else (methods[0] if de else None)
    for p in g.cats[1:]:
        gi = g.cats.get_loc(p)
        targets = condition_targets(p, control)
        measured = [t for t in targets if t in sym_to_idx]
        row: dict[str, Any] = {
            "perturbation": p,
            "n_cells": int(g.n_cells[gi]),
            "zero_fraction": float(1 - zeros["nnz_g"][gi].sum() / (g.n_cells[gi] * n_genes)),
            "tested": p in tested,
            "target_genes": "+".join(targets),
            "target_measured": bool(measured) and len(measured) == len(targets),
            # within-group spread of this perturbation vs control, over all genes
            "median_gene_var": float(np.median(var_g[gi])),
            "median_gene_var_ctrl": float(np.median(var_g[0])),
        }
        target_names = {genes[sym_to_idx[t]] for t in measured}
        for m, df in de.items():
            row.update(_de_columns(df[df["group"] == p], m, row, target_names, pval, min_lfc))
        if rank_m is not None and p in tested:
            top = de[rank_m][de[rank_m]["group"] == p].head(n_top_de)
            gidx = genes.get_indexer(top["gene"])
            eff = var["means"][gi, gidx] - var["means"][0, gidx]
            row.update(_top_de_effect(eff, ctrl_sd[gidx]))
            top_rows.extend(
                {"perturbation": p, "gene": genes[j], "effect": float(e), "ctrl_sd": float(s)}
                for j, e, s in zip(gidx, eff, ctrl_sd[gidx], strict=True)
            )
        rows.append(row)
    return pd.DataFrame(rows), top_rows


def _de_columns(
    sub: pd.DataFrame,
    m: str,
    row: dict[str, Any],
    target_names: set[str],
    pval: float,
    min_lfc: float,
) -> dict[str, Any]:
    """DE counts of one perturbation with method ``m`` and whether its target changes."""
    out: dict[str, Any] = {}
    if sub.empty:
        out[f"n_significant_{m}"] = np.nan
        out[f"target_significant_{m}"] = np.nan
        return out
    sig = (sub["pvals_adj"] < pval) & (sub["lfc"].abs() > min_lfc if min_lfc > 0 else True)
    out[f"n_significant_{m}"] = int(sig.sum())
    out[f"n_up_{m}"] = int((sig & (sub["lfc"] > 0)).sum())
    out[f"n_down_{m}"] = int((sig & (sub["lfc"] < 0)).sum())
    if row["target_measured"]:
        is_target = sub["gene"].isin(target_names)
        tsub = sub[is_target]
        tsig = sig[is_target]
        out[f"target_significant_{m}"] = bool(len(tsub) and tsig.all())
        out[f"target_lfc_{m}"] = float(tsub["lfc"].mean()) if len(tsub) else np.nan
        out[f"target_rank_{m}"] = int(tsub["rank"].max()) + 1 if len(tsub) else np.nan
    else:
        out[f"target_significant_{m}"] = np.nan
    return out


def _top_de_effect(eff: np.ndarray, sd: np.ndarray) -> dict[str, float]:
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(sd > 0, np.abs(eff) / sd, np.nan)
    return {
        "top_de_median_abs_effect": float(np.median(np.abs(eff))),
        "top_de_median_ctrl_sd": float(np.median(sd)),
        "top_de_median_effect_over_ctrl_sd": (
            float(np.nanmedian(ratio)) if np.isfinite(ratio).any() else np.nan
        ),
        "top_de_frac_effect_gt_ctrl_sd": float(np.mean(np.abs(eff) > sd)),
    }


def _per_gene(
    genes: pd.Index,
    symbols: pd.Index,
    zeros: dict[str, Any],
    var: dict[str, np.ndarray],
    ctrl_mv: tuple[np.ndarray, np.ndarray, np.ndarray],
    de: dict[str, pd.DataFrame],
    pval: float,
    min_lfc: float,
) -> pd.DataFrame:
    """One row per gene: zeros, control moments, variance decomposition, DE counts."""
    means, var_g = var["means"], var["var_g"]
    c_mean, c_var, phi = ctrl_mv
    n_groups = means.shape[0]
    per_gene = pd.DataFrame(
        {
            "gene": genes,
            "gene_name": symbols,
            "zero_fraction_ctrl": zeros["ctrl_gene"],
            "zero_fraction_perturbed": zeros["pert_gene"],
            "all_zero_in_ctrl": zeros["all_zero_ctrl"],
            "mean_ctrl": means[0],
            "var_ctrl": var_g[0],
            "mean_within_var_perturbed": var_g[1:].mean(0) if n_groups > 1 else np.nan,
            "var_of_group_means": means.var(0, ddof=1) if n_groups > 1 else np.nan,
            "ss_total": var["ss_total"],
            "ss_within": var["ss_within"],
            "ss_between": var["ss_between"],
            "frac_within": var["frac_within"],
            "frac_between": var["frac_between"],
            "ctrl_mean_input": c_mean,
            "ctrl_var_input": c_var,
            "overdispersion_phi": phi,
        }
    )
    for m in de:
        sig_long = de[m][(de[m]["pvals_adj"] < pval) & (de[m]["lfc"].abs() > min_lfc)]
        counts = sig_long["gene"].value_counts()
        per_gene[f"n_perturbations_significant_{m}"] = (
            per_gene["gene"].map(counts).fillna(0).astype(int)
        )
    return per_gene


__all__ = [
    "LOG",
    "METHODS",
    "NORM",
    "RAW",
    "PerturbationStats",
    "compute_perturbation_stats",
    "detect_input_kind",
    "report_sentences",
]
