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

``compute_perturbation_stats(adata, ...) -> PerturbationStats`` does the work;
``write_stats(result, out_dir)`` writes ``stats.json``, the two CSV tables, the plots and
``report.html``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from celltune.data.io import get_matrix
from celltune.errors import InputError

logger = logging.getLogger(__name__)

METHODS = ("wilcoxon", "t-test")
RAW = "raw counts"
LOG = "log-normalised"
NORM = "normalised (not log)"


@dataclass
class PerturbationStats:
    """All figures of a stats run: a JSON-able summary and two tables."""

    summary: dict[str, Any]
    per_perturbation: pd.DataFrame
    per_gene: pd.DataFrame
    top_de: pd.DataFrame = field(default_factory=pd.DataFrame)
    ctrl_counts_mean_var: pd.DataFrame = field(default_factory=pd.DataFrame)


# ---------------------------------------------------------------- helpers


def _data(X: Any) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def detect_input_kind(X: Any) -> str:
    """``raw counts`` (non-negative integers), ``log-normalised`` (SPEC §1 rule) or other."""
    d = _data(X)
    if d.size and not np.all(np.isfinite(d)):
        raise InputError("X holds NaN or infinite values. Fix: clean the matrix before stats.")
    if d.size and d.min() < 0:
        raise InputError(
            "X holds negative values (scaled data?). Fix: use counts or log-normalised values "
            "(pick a layer with --layer)."
        )
    if d.size == 0 or np.all(d == np.round(d)):
        return RAW
    nz = d[d != 0]
    if d.max() <= 30 and nz.min() < 1:
        return LOG
    return NORM


def _indicator(codes: np.ndarray, n_groups: int) -> sp.csr_matrix:
    n = codes.size
    return sp.csr_matrix((np.ones(n, np.float64), (codes, np.arange(n))), shape=(n_groups, n))


def _group_moments(
    X: sp.csr_matrix, codes: np.ndarray, n_groups: int, values: bool, chunk: int = 20000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group × gene: non-zero counts, sums and sums of squares (float64).

    Works on row chunks so the temporaries stay a fraction of ``X``.
    """
    shape = (n_groups, X.shape[1])
    nnz, sums, sumsq = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for start in range(0, X.shape[0], chunk):
        block = X[start : start + chunk]
        G = _indicator(codes[start : start + chunk], n_groups)
        data = block.data.astype(np.float64)
        ind = sp.csr_matrix(
            ((data != 0).astype(np.float64), block.indices, block.indptr), block.shape
        )
        nnz += _dense(G @ ind)
        if values:
            sums += _dense(G @ sp.csr_matrix((data, block.indices, block.indptr), block.shape))
            sumsq += _dense(G @ sp.csr_matrix((data**2, block.indices, block.indptr), block.shape))
    return nnz, sums, sumsq


def _dense(m: Any) -> np.ndarray:
    return np.asarray(m.todense() if sp.issparse(m) else m, dtype=np.float64)


def _log_normalise(X: sp.csr_matrix) -> sp.csr_matrix:
    """Total-count normalise to the median library size, then log1p (scanpy's default)."""
    totals = np.asarray(X.sum(axis=1)).ravel()
    target = float(np.median(totals[totals > 0])) if np.any(totals > 0) else 1.0
    scale = np.divide(target, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    out = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ X, dtype=np.float32)
    np.log1p(out.data, out=out.data)
    return out


def _targets(cond: str, control: str) -> tuple[str, ...]:
    """Perturbed genes named by a condition (GEARS ``A+B`` / ``A+ctrl`` or a bare gene)."""
    if cond == control:
        return ()
    return tuple(p for p in str(cond).split("+") if p and p != "ctrl")


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (NaN-safe)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    if q.size:
        order = np.argsort(q)
        ranked = q[order] * q.size / np.arange(1, q.size + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        res = np.empty_like(q)
        res[order] = np.minimum(ranked, 1.0)
        out[ok] = res
    return out


def _quartiles(v: np.ndarray) -> dict[str, float]:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan")}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {
        "median": float(med),
        "q1": float(q1),
        "q3": float(q3),
        "min": float(v.min()),
        "max": float(v.max()),
    }


# ---------------------------------------------------------------- DE


def _rank_genes(
    Xlog: sp.csr_matrix,
    groups: pd.Series,
    control: str,
    tested: list[str],
    method: str,
    var_names: pd.Index,
) -> pd.DataFrame:
    """Long table (group, gene, score, lfc, pvals, pvals_adj) from scanpy for ``tested``."""
    import scanpy as sc

    mask = groups.isin([*tested, control]).to_numpy()
    n_sub = int(mask.sum())
    sub = AnnData(
        X=Xlog if mask.all() else Xlog[mask],
        obs=pd.DataFrame(
            {"g": pd.Categorical(groups[mask].astype(str).to_numpy())},
            index=pd.Index([str(i) for i in range(n_sub)]),
        ),
        var=pd.DataFrame(index=pd.Index(var_names.astype(str))),
    )
    sub.uns["log1p"] = {"base": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            sub,
            groupby="g",
            groups=tested,
            reference=control,
            method=method,
            n_genes=sub.n_vars,
            rankby_abs=True,
            use_raw=False,
            corr_method="benjamini-hochberg",
        )
        df = sc.get.rank_genes_groups_df(sub, group=None)
    if "group" not in df.columns:  # a single tested group comes back without the column
        df.insert(0, "group", tested[0])
    df = df.rename(columns={"names": "gene", "logfoldchanges": "lfc"})
    df["group"] = df["group"].astype(str)
    df["rank"] = df.groupby("group").cumcount()
    return df[["group", "gene", "rank", "scores", "lfc", "pvals", "pvals_adj"]]


# ---------------------------------------------------------------- main


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
    X = get_matrix(adata, layer)
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    X.sum_duplicates()
    kind = detect_input_kind(X)
    logger.info("input assumed to be %s", kind)

    cond = adata.obs[condition_key].astype(str).reset_index(drop=True)
    if not (cond == control).any():
        found = ", ".join(repr(c) for c in pd.unique(cond)[:8])
        raise InputError(
            f"no control cells: no {condition_key!r} value equals {control!r} (values: {found}"
            "...). Fix: pass the control value with --control."
        )
    cats = pd.Index([control, *sorted(set(pd.unique(cond)) - {control})])
    codes = cats.get_indexer(cond)
    n_groups, n_genes = len(cats), X.shape[1]
    n_cells = np.bincount(codes, minlength=n_groups).astype(np.float64)
    is_ctrl = codes == 0

    # zeros (pattern identical in counts and log data)
    nnz_g, _, _ = _group_moments(X, codes, n_groups, values=False)
    zero_frac_g = 1 - nnz_g / n_cells[:, None]
    n_pert_cells = n_cells[1:].sum()
    ctrl_zero_gene = zero_frac_g[0]
    pert_zero_gene = (
        1 - nnz_g[1:].sum(0) / n_pert_cells if n_pert_cells else np.full(n_genes, np.nan)
    )
    zero_ctrl = float(1 - nnz_g[0].sum() / (n_cells[0] * n_genes))
    zero_pert = float(1 - nnz_g[1:].sum() / (n_pert_cells * n_genes)) if n_pert_cells else np.nan
    all_zero_ctrl = nnz_g[0] == 0

    # log-normalised values for DE and variance (one float32 copy at most)
    if kind == RAW:
        Xlog = _log_normalise(X)
    else:
        Xlog = X if X.dtype == np.float32 else X.astype(np.float32)
    _, sums, sumsq = _group_moments(Xlog, codes, n_groups, values=True)
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

    # mean–variance in control cells (counts when raw, else the values given)
    n_c = int(is_ctrl.sum())
    _, c_sum, c_sumsq = _group_moments(X[is_ctrl], np.zeros(n_c, np.int64), 1, values=True)
    c_mean = c_sum[0] / n_c
    c_var = (c_sumsq[0] - n_c * c_mean**2) / max(n_c - 1, 1)
    c_var = np.maximum(c_var, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where(c_mean > 0, (c_var - c_mean) / c_mean**2, np.nan)

    genes = pd.Index(adata.var_names.astype(str))
    symbols = (
        pd.Index(adata.var["gene_name"].astype(str)) if "gene_name" in adata.var.columns else genes
    )
    sym_to_idx = {s: i for i, s in enumerate(symbols)}
    sym_to_idx.update({g: i for i, g in enumerate(genes)})

    # DE per perturbation
    perts = list(cats[1:])
    tested = [p for p in perts if n_cells[cats.get_loc(p)] >= min_cells]
    skipped = [p for p in perts if p not in tested]
    if n_cells[0] < min_cells:
        raise InputError(
            f"only {int(n_cells[0])} control cell(s); DE tests need at least {min_cells}. "
            "Fix: check --control."
        )
    de: dict[str, pd.DataFrame] = {}
    for m in methods:
        if tested:
            logger.info("rank_genes_groups (%s) on %d perturbations", m, len(tested))
            de[m] = _rank_genes(Xlog, cond, control, tested, m, genes)

    rows = []
    top_rows = []
    ctrl_sd = np.sqrt(var_g[0])
    for p in perts:
        gi = cats.get_loc(p)
        targets = _targets(p, control)
        measured = [t for t in targets if t in sym_to_idx]
        row: dict[str, Any] = {
            "perturbation": p,
            "n_cells": int(n_cells[gi]),
            "zero_fraction": float(1 - nnz_g[gi].sum() / (n_cells[gi] * n_genes)),
            "tested": p in tested,
            "target_genes": "+".join(targets),
            "target_measured": bool(measured) and len(measured) == len(targets),
            # within-group spread of this perturbation vs control, over all genes
            "median_gene_var": float(np.median(var_g[gi])),
            "median_gene_var_ctrl": float(np.median(var_g[0])),
        }
        for m, df in de.items():
            sub = df[df["group"] == p]
            if sub.empty:
                row[f"n_significant_{m}"] = np.nan
                row[f"target_significant_{m}"] = np.nan
                continue
            sig = (sub["pvals_adj"] < pval) & (sub["lfc"].abs() > min_lfc if min_lfc > 0 else True)
            row[f"n_significant_{m}"] = int(sig.sum())
            row[f"n_up_{m}"] = int((sig & (sub["lfc"] > 0)).sum())
            row[f"n_down_{m}"] = int((sig & (sub["lfc"] < 0)).sum())
            if row["target_measured"]:
                idx_names = {genes[sym_to_idx[t]] for t in measured}
                tsub = sub[sub["gene"].isin(idx_names)]
                tsig = sig[sub["gene"].isin(idx_names)]
                row[f"target_significant_{m}"] = bool(len(tsub) and tsig.all())
                row[f"target_lfc_{m}"] = float(tsub["lfc"].mean()) if len(tsub) else np.nan
                row[f"target_rank_{m}"] = int(tsub["rank"].max()) + 1 if len(tsub) else np.nan
            else:
                row[f"target_significant_{m}"] = np.nan
        # top-20 DE effect sizes vs control spread (t-test ranking as GEARS, else first)
        rank_m = "t-test" if "t-test" in de else (methods[0] if de else None)
        if rank_m is not None and p in tested:
            top = de[rank_m][de[rank_m]["group"] == p].head(n_top_de)
            gidx = genes.get_indexer(top["gene"])
            eff = means[gi, gidx] - means[0, gidx]
            sd = ctrl_sd[gidx]
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(sd > 0, np.abs(eff) / sd, np.nan)
            row["top_de_median_abs_effect"] = float(np.median(np.abs(eff)))
            row["top_de_median_ctrl_sd"] = float(np.median(sd))
            row["top_de_median_effect_over_ctrl_sd"] = (
                float(np.nanmedian(ratio)) if np.isfinite(ratio).any() else np.nan
            )
            row["top_de_frac_effect_gt_ctrl_sd"] = float(np.mean(np.abs(eff) > sd))
            top_rows.extend(
                {
                    "perturbation": p,
                    "gene": genes[j],
                    "effect": float(e),
                    "ctrl_sd": float(s),
                }
                for j, e, s in zip(gidx, eff, sd, strict=True)
            )
        rows.append(row)
    per_pert = pd.DataFrame(rows)

    per_gene = pd.DataFrame(
        {
            "gene": genes,
            "gene_name": symbols,
            "zero_fraction_ctrl": ctrl_zero_gene,
            "zero_fraction_perturbed": pert_zero_gene,
            "all_zero_in_ctrl": all_zero_ctrl,
            "mean_ctrl": means[0],
            "var_ctrl": var_g[0],
            "mean_within_var_perturbed": var_g[1:].mean(0) if len(perts) else np.nan,
            "var_of_group_means": means.var(0, ddof=1) if n_groups > 1 else np.nan,
            "ss_total": ss_total,
            "ss_within": ss_within,
            "ss_between": ss_between,
            "frac_within": frac_within,
            "frac_between": frac_between,
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

    summary = _summarise(
        per_pert=per_pert,
        per_gene=per_gene,
        kind=kind,
        methods=list(de),
        zero_ctrl=zero_ctrl,
        zero_pert=zero_pert,
        n_cells=n_cells,
        n_genes=n_genes,
        skipped=skipped,
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

    sys_table, summary["systematic_variation"] = systematic_variation(Xlog, codes, list(cats))
    per_pert = per_pert.merge(sys_table, on="perturbation", how="left")
    mv = pd.DataFrame({"mean": c_mean, "var": c_var})
    return PerturbationStats(summary, per_pert, per_gene, pd.DataFrame(top_rows), mv)


def _summarise(
    *,
    per_pert: pd.DataFrame,
    per_gene: pd.DataFrame,
    kind: str,
    methods: list[str],
    zero_ctrl: float,
    zero_pert: float,
    n_cells: np.ndarray,
    n_genes: int,
    skipped: list[str],
    params: dict[str, Any],
) -> dict[str, Any]:
    """The machine-readable headline figures (``stats.json``)."""
    s: dict[str, Any] = {
        "input_assumed": kind,
        "normalised_for_tests": kind == RAW,
        "n_cells": int(n_cells.sum()),
        "n_control_cells": int(n_cells[0]),
        "n_perturbed_cells": int(n_cells[1:].sum()),
        "n_genes": int(n_genes),
        "n_perturbations": len(per_pert),
        "perturbations_not_tested": skipped,
        "parameters": params,
        "zero_fraction": {"control": zero_ctrl, "perturbed": zero_pert},
        "zero_fraction_control": zero_ctrl,
        "zero_fraction_perturbed": zero_pert,
        "zero_fraction_per_perturbation": _quartiles(per_pert["zero_fraction"].to_numpy()),
        "zero_fraction_per_gene_control": _quartiles(per_gene["zero_fraction_ctrl"].to_numpy()),
        "zero_fraction_per_gene_perturbed": _quartiles(
            per_gene["zero_fraction_perturbed"].to_numpy()
        ),
        "n_genes_zero_in_all_control_cells": int(per_gene["all_zero_in_ctrl"].sum()),
    }
    sig: dict[str, Any] = {}
    for m in methods:
        col = f"n_significant_{m}"
        t = per_pert[per_pert["tested"]].sort_values(col, ascending=False)
        q = _quartiles(t[col].to_numpy(dtype=float))
        meas = per_pert[per_pert["target_measured"] & per_pert["tested"]]
        tcol = f"target_significant_{m}"
        frac = float(meas[tcol].astype(float).mean()) if len(meas) else float("nan")
        down = (
            float((meas[f"target_lfc_{m}"] < 0).mean())
            if len(meas) and f"target_lfc_{m}" in meas
            else float("nan")
        )
        sig[m] = {
            **q,
            "most": dict(zip(t["perturbation"].head(5), t[col].head(5).astype(int), strict=True)),
            "fewest": dict(
                zip(t["perturbation"].tail(5)[::-1], t[col].tail(5)[::-1].astype(int), strict=True)
            ),
            "n_perturbations_with_none": int((t[col] == 0).sum()),
            "n_perturbations_with_target_measured": len(meas),
            "fraction_target_significant": frac,
            "n_target_significant": int(meas[tcol].astype(float).sum()) if len(meas) else 0,
            "fraction_target_down": down,
            "targets_not_significant": meas.loc[~meas[tcol].astype(bool), "perturbation"].tolist(),
        }
    s["significant_genes"] = sig
    if "top_de_median_effect_over_ctrl_sd" in per_pert:
        s["top_de_effect_over_ctrl_sd"] = _quartiles(
            per_pert["top_de_median_effect_over_ctrl_sd"].to_numpy(dtype=float)
        )
        s["top_de_frac_effect_gt_ctrl_sd"] = _quartiles(
            per_pert["top_de_frac_effect_gt_ctrl_sd"].to_numpy(dtype=float)
        )
    tot = float(per_gene["ss_total"].sum())
    s["variance"] = {
        "fraction_between_overall": float(per_gene["ss_between"].sum() / tot) if tot else None,
        "fraction_within_overall": float(per_gene["ss_within"].sum() / tot) if tot else None,
        "fraction_between_per_gene": _quartiles(per_gene["frac_between"].to_numpy()),
        "n_genes_between_gt_0.01": int((per_gene["frac_between"] > 0.01).sum()),
        "n_genes_between_gt_0.1": int((per_gene["frac_between"] > 0.1).sum()),
        "median_var_ctrl": float(np.nanmedian(per_gene["var_ctrl"])),
        "median_within_var_perturbed": float(np.nanmedian(per_gene["mean_within_var_perturbed"])),
        "median_var_of_group_means": float(np.nanmedian(per_gene["var_of_group_means"])),
    }
    expressed = per_gene["ctrl_mean_input"] > 0
    phi = per_gene.loc[expressed, "overdispersion_phi"].to_numpy(dtype=float)
    s["mean_variance"] = {
        "values": kind,
        "n_genes_expressed_in_ctrl": int(expressed.sum()),
        "fraction_var_gt_mean": float(
            (
                per_gene.loc[expressed, "ctrl_var_input"]
                > per_gene.loc[expressed, "ctrl_mean_input"]
            ).mean()
        )
        if expressed.any()
        else None,
        "median_overdispersion_phi": float(np.nanmedian(phi)) if phi.size else None,
    }
    return s


# ---------------------------------------------------------------- output


def _pct(x: float | None) -> str:
    """Percent with one decimal below 10% (so small fractions do not read as 0%)."""
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{100 * x:.1f}%" if abs(x) < 0.1 else f"{100 * x:.0f}%"


def report_sentences(s: dict[str, Any]) -> dict[str, str]:
    """One plain-language reading per figure, from the summary."""
    zg = s["zero_fraction_per_gene_control"]
    out = {
        "input": (
            f"The input was assumed to be {s['input_assumed']}"
            + (
                "; it was normalised to the median library size and log1p-transformed for "
                "the DE tests and the variance decomposition."
                if s["normalised_for_tests"]
                else "; it was used as is."
            )
            + f" {s['n_cells']:,} cells ({s['n_control_cells']:,} control), "
            f"{s['n_genes']:,} genes, {s['n_perturbations']} perturbations."
        ),
        "zeros": (
            f"In control cells {_pct(s['zero_fraction_control'])} of values are zero; in "
            f"perturbed cells {_pct(s['zero_fraction_perturbed'])}. The median gene is zero in "
            f"{_pct(zg['median'])} of control cells, and {s['n_genes_zero_in_all_control_cells']}"
            f" of {s['n_genes']} genes are zero in every control cell."
        ),
    }
    sig = s.get("significant_genes", {})
    if sig:
        parts = []
        for m, d in sig.items():
            most = next(iter(d["most"].items()), ("-", 0))
            fewest = next(iter(d["fewest"].items()), ("-", 0))
            parts.append(
                f"With the {m.replace('-test', '')} test a perturbation changes a median of "
                f"{d['median']:.0f} genes "
                f"(quartiles {d['q1']:.0f}–{d['q3']:.0f}); most: {most[0]} ({most[1]}), fewest: "
                f"{fewest[0]} ({fewest[1]}); {d['n_perturbations_with_none']} change none."
            )
        out["significant"] = " ".join(parts)
        m0, d0 = next(iter(sig.items()))
        out["target"] = (
            f"The perturbed gene is measured for {d0['n_perturbations_with_target_measured']} "
            f"perturbations; it is itself significantly changed ({m0}) in "
            f"{d0['n_target_significant']} of them ({_pct(d0['fraction_target_significant'])}), "
            f"and lower than in control in {_pct(d0['fraction_target_down'])}."
        )
    if "top_de_effect_over_ctrl_sd" in s:
        e = s["top_de_effect_over_ctrl_sd"]
        f = s["top_de_frac_effect_gt_ctrl_sd"]
        out["effect"] = (
            f"For the top-20 DE genes the mean change is a median {e['median']:.2f} control "
            f"standard deviations (quartiles over perturbations {e['q1']:.2f}–{e['q3']:.2f}); a "
            f"median {_pct(f['median'])} of them move by more than one control SD."
        )
    v = s["variance"]
    vb = v["fraction_between_per_gene"]
    out["variance"] = (
        f"Perturbations explain {_pct(v['fraction_between_overall'])} of the total variance "
        f"(summed over genes); per gene the median is {_pct(vb['median'])}, and "
        f"{v['n_genes_between_gt_0.1']} genes have more than 10% explained. The rest is "
        "cell-to-cell variation within groups."
    )
    mv = s["mean_variance"]
    if s["input_assumed"] == RAW and mv["median_overdispersion_phi"] is not None:
        out["mean_variance"] = (
            f"In control cells {_pct(mv['fraction_var_gt_mean'])} of expressed genes have a "
            f"count variance above their mean (over-dispersed relative to Poisson); the median "
            f"negative-binomial dispersion is {mv['median_overdispersion_phi']:.2f}."
        )
    else:
        out["mean_variance"] = (
            "Mean and variance of the given (non-count) values in control cells; over-dispersion "
            "against Poisson can only be judged on raw counts."
        )
    return out


def write_stats(result: PerturbationStats, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write stats.json, per_perturbation.csv, per_gene.csv, PNG plots and report.html."""
    from celltune.files import atomic_path, write_json_atomic
    from celltune.report import stats_plots
    from celltune.report.html import Section, write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    sentences = report_sentences(result.summary)
    summary = {**result.summary, "readings": sentences}
    write_json_atomic(out / "stats.json", summary)
    paths["stats.json"] = out / "stats.json"
    for name, df in (
        ("per_perturbation.csv", result.per_perturbation),
        ("per_gene.csv", result.per_gene),
    ):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
        paths[name] = out / name
    figs = stats_plots.plot_all(result, out)
    paths.update(figs)

    s = result.summary
    sections = [
        Section("Input", text=[sentences["input"]]),
        Section(
            "Zeros",
            text=[sentences["zeros"]],
            images=[figs["zero_fraction_hist.png"]],
            captions=["Per-gene fraction of zero values, control vs perturbed cells"],
        ),
    ]
    if "significant" in sentences:
        cols = [
            c
            for c in result.per_perturbation.columns
            if c.startswith(("n_significant_", "target_significant_"))
        ]
        table = (
            result.per_perturbation.set_index("perturbation")[["n_cells", *cols]]
            .sort_values(cols[0], ascending=False)
            .head(30)
        )
        sections.append(
            Section(
                "Significant changes",
                text=[sentences["significant"], sentences["target"]],
                tables=[table],
                images=[figs["n_significant.png"]],
                captions=[f"Genes with BH-adjusted p < {s['parameters']['pval']} per perturbation"],
            )
        )
    if "effect" in sentences and "effect_vs_ctrl_sd.png" in figs:
        sections.append(
            Section(
                "Top-20 DE effect size vs control spread",
                text=[sentences["effect"]],
                images=[figs["effect_vs_ctrl_sd.png"]],
                captions=["|mean change| vs control SD of each top-20 DE gene (log scale)"],
            )
        )
    sections.append(
        Section(
            "Variance and mean–variance",
            text=[sentences["variance"], sentences["mean_variance"]],
            images=[figs["variance_fraction.png"], figs["mean_variance.png"]],
            captions=[
                "Per-gene fraction of variance between perturbation groups",
                "Mean vs variance per gene in control cells",
            ],
        )
    )
    write_report(
        out / "report.html",
        "Perturbation data statistics",
        sections,
        meta=f"input assumed: {s['input_assumed']}; tests: {', '.join(s['significant_genes'])}",
    )
    paths["report.html"] = out / "report.html"
    return paths
