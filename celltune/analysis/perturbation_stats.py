"""What a perturbation dataset looks like before any model is trusted on it.

Answers the questions of issue 6 for any Perturb-seq AnnData with a condition column:
zeros (overall, per perturbation, per gene), significant changes against control
(scanpy ``rank_genes_groups``, BH-adjusted), the size of the top-20 DE changes relative
to the spread in control cells, whether the perturbed gene itself changes, and a per-gene
variance decomposition (within vs between perturbation groups) with the mean–variance
relationship.

Everything but the DE tests is computed from per-group sums accumulated over row chunks
(``perturbation_pass``: an indicator matrix times each chunk), so memory is one chunk plus
dense (groups × genes) tables; the same passes read an AnnData or a file on disk
(``celltune stats --stream``), so both give the same figures. The DE tests need a group's
cells at once: per perturbation, on its cells and the control cells, optionally a
bounded seeded subsample of each (``de_max_cells``).
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
    rank_genes,
)
from celltune.analysis.perturbation_pass import (
    CHUNK_ROWS,
    Moments,
    accumulate,
    de_rows,
    half_labels,
    library_target,
    read_log_rows,
    scan_input,
)
from celltune.analysis.perturbation_summary import report_sentences, summarise
from celltune.data.source import AnnDataSource, CellSource, open_source
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
    data: AnnData | CellSource,
    *,
    condition_key: str = "condition",
    control: str = "ctrl",
    layer: str | None = None,
    pval: float = 0.05,
    min_lfc: float = 0.0,
    methods: Sequence[str] = METHODS,
    n_top_de: int = 20,
    min_cells: int = 3,
    chunk_rows: int = CHUNK_ROWS,
    de_max_cells: int | None = None,
    seed: int = 0,
) -> PerturbationStats:
    """Compute every figure of issue 6 (see the module docstring).

    ``data`` is an AnnData or a :class:`~celltune.data.source.CellSource` (a
    ``StoreSource`` streams the file: ``celltune stats --stream``). Moments come from the
    same chunked passes either way (``perturbation_pass``), so they are equal. DE tests
    run per perturbation vs the control cells, each group a seeded subsample of at most
    ``de_max_cells``; an AnnData without a cap is tested in one scanpy call (same figures).
    """
    from celltune.analysis.perturbation_systematic import systematic_from_sums

    source = open_source(data, layer)
    methods = _check_arguments(source.obs_keys(), condition_key, pval, min_lfc, methods)
    if de_max_cells is not None and de_max_cells < min_cells:
        raise InputError(f"--de-max-cells must be >= {min_cells}, got {de_max_cells}")
    g = _groups(source.obs_column(condition_key, "the conditions"), condition_key, control)
    kind, totals, target, mom = _passes(source, g, chunk_rows, seed)
    zeros = _zeros(mom.nnz, g)
    var = _variance(mom.sums, mom.sumsq, g)
    c_mean, c_var, phi = _control_mean_variance(mom.ctrl_sum, mom.ctrl_sumsq, g)
    genes, symbols = _gene_names(source)
    perts = list(g.cats[1:])
    tested = [p for p in perts if g.n_cells[g.cats.get_loc(p)] >= min_cells]
    if g.n_cells[0] < min_cells:
        raise InputError(
            f"only {int(g.n_cells[0])} control cell(s); DE tests need at least {min_cells}. "
            "Fix: check --control."
        )
    de, de_info = _de(
        source, g, tested, control, methods, genes, (totals, target), chunk_rows, de_max_cells, seed
    )
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
        n_genes=source.n_vars,
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
            "de_max_cells": de_max_cells,
            "streamed": not isinstance(source, AnnDataSource),
        },
    )
    summary["de_cells"] = de_info
    sys_table, summary["systematic_variation"] = systematic_from_sums(
        mom.sums, g.n_cells, mom.half_sums, mom.half_n, list(g.cats)
    )
    per_pert = per_pert.merge(sys_table, on="perturbation", how="left")
    mv = pd.DataFrame({"mean": c_mean, "var": c_var})
    return PerturbationStats(summary, per_pert, per_gene, pd.DataFrame(top_rows), mv)


# ---------------------------------------------------------------- steps


def _passes(
    source: CellSource, g: _Groups, chunk_rows: int, seed: int
) -> tuple[str, np.ndarray, float | None, Moments]:
    """Input kind, library sizes, normalisation target and every moment (two passes)."""
    kind, totals = scan_input(source, chunk_rows)
    logger.info("input assumed to be %s", kind)
    target = library_target(totals) if kind == RAW else None
    half = half_labels(g.codes, g.n_groups, seed)
    mom = accumulate(source, g.codes, g.n_groups, half, totals, target, chunk_rows)
    return kind, totals, target, mom


def _gene_names(source: CellSource) -> tuple[pd.Index, pd.Index]:
    """Gene ids and symbols (``var['gene_name']`` when present)."""
    genes = pd.Index(source.var_names().astype(str))
    var_frame = source.var_frame()
    if "gene_name" in var_frame.columns:
        return genes, pd.Index(var_frame["gene_name"].astype(str))
    return genes, genes


def _check_arguments(
    obs_keys: Sequence[str], condition_key: str, pval: float, min_lfc: float, methods: Sequence[str]
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
    if condition_key not in obs_keys:
        raise InputError(
            f"obs column {condition_key!r} not found (columns: "
            f"{', '.join(map(str, obs_keys))}). Fix: pass --condition-key."
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


def _groups(column: pd.Series, condition_key: str, control: str) -> _Groups:
    cond = column.astype(str).reset_index(drop=True)
    if not (cond == control).any():
        found = ", ".join(repr(c) for c in pd.unique(cond)[:8])
        raise InputError(
            f"no control cells: no {condition_key!r} value equals {control!r} (values: {found}"
            "...). Fix: pass the control value with --control."
        )
    cats = pd.Index([control, *sorted(set(pd.unique(cond)) - {control})])
    if len(cats) < 2:  # every statistic compares perturbed cells with control cells
        raise InputError(
            f"only control cells: all {len(cond):,} cells have {condition_key} == "
            f"{control!r}, and stats compares perturbed cells with them. Fix: give a file "
            "with perturbed cells too, or check --condition-key and --control."
        )
    codes = cats.get_indexer(cond)
    n_cells = np.bincount(codes, minlength=len(cats)).astype(np.float64)
    return _Groups(cond, cats, codes, n_cells)


def _zeros(nnz_g: np.ndarray, g: _Groups) -> dict[str, Any]:
    """Zero fractions (the pattern is identical in counts and log data)."""
    n_genes = nnz_g.shape[1]
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


def _variance(sums: np.ndarray, sumsq: np.ndarray, g: _Groups) -> dict[str, np.ndarray]:
    """Group means and variances, and the within / between decomposition per gene."""
    n_cells = g.n_cells
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
    c_sum: np.ndarray, c_sumsq: np.ndarray, g: _Groups
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance and NB over-dispersion in control cells (counts when raw)."""
    n_c = int(g.n_cells[0])
    c_mean = c_sum / n_c
    c_var = (c_sumsq - n_c * c_mean**2) / max(n_c - 1, 1)
    c_var = np.maximum(c_var, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where(c_mean > 0, (c_var - c_mean) / c_mean**2, np.nan)
    return c_mean, c_var, phi


def _de(
    source: CellSource,
    g: _Groups,
    tested: list[str],
    control: str,
    methods: list[str],
    genes: pd.Index,
    norm: tuple[np.ndarray, float | None],
    chunk_rows: int,
    cap: int | None,
    seed: int,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """scanpy DE tables per method, and which cells they used (``stats.json: de_cells``).

    Whole matrix in one call for an AnnData without a cap; else per perturbation on its
    (subsampled) cells and the (subsampled) control cells, read from the source."""
    totals, target = norm
    de: dict[str, pd.DataFrame] = {}
    if not tested or not methods:
        return de, {"mode": "none"}
    if cap is None and isinstance(source, AnnDataSource):
        Xlog = read_log_rows(source, np.arange(source.n_obs), totals, target, chunk_rows)
        for m in methods:
            logger.info("rank_genes_groups (%s) on %d perturbations", m, len(tested))
            de[m] = rank_genes(Xlog, g.cond, control, tested, m, genes)
        return de, {"mode": "all cells, one call", "max_cells_per_group": None}
    ctrl_rows = de_rows(g.codes, 0, cap, seed)
    ctrl = read_log_rows(source, ctrl_rows, totals, target, chunk_rows)
    parts: dict[str, list[pd.DataFrame]] = {m: [] for m in methods}
    n_sub = {control: int(ctrl_rows.size)}
    for p in tested:
        gi = g.cats.get_loc(p)
        rows = de_rows(g.codes, gi, cap, seed)
        n_sub[p] = int(rows.size)
        X = sp.vstack([ctrl, read_log_rows(source, rows, totals, target, chunk_rows)]).tocsr()
        labels = pd.Series([control] * ctrl_rows.size + [p] * rows.size)
        for m in methods:
            parts[m].append(rank_genes(X, labels, control, [p], m, genes))
    for m in methods:
        de[m] = pd.concat(parts[m], ignore_index=True)
    subsampled = {k: v for k, v in n_sub.items() if v < g.n_cells[g.cats.get_loc(k)]}
    if subsampled:
        shown = list(subsampled.items())[:8]
        logger.info(
            "DE tests on a seeded subsample of at most %d cells per group (seed %d) for %d "
            "group(s): %s",
            cap,
            seed,
            len(subsampled),
            ", ".join(f"{k} {v:,}/{int(g.n_cells[g.cats.get_loc(k)]):,}" for k, v in shown),
        )
    return de, {
        "mode": "per perturbation vs control",
        "max_cells_per_group": cap,
        "seed": seed,
        "subsampled_groups": subsampled,
    }


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
