"""The headline figures of ``celltune stats`` (``stats.json``) and their plain-language readings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from celltune.analysis.perturbation_groups import RAW, quartiles


def summarise(
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
        "zero_fraction_per_perturbation": quartiles(per_pert["zero_fraction"].to_numpy()),
        "zero_fraction_per_gene_control": quartiles(per_gene["zero_fraction_ctrl"].to_numpy()),
        "zero_fraction_per_gene_perturbed": quartiles(
            per_gene["zero_fraction_perturbed"].to_numpy()
        ),
        "n_genes_zero_in_all_control_cells": int(per_gene["all_zero_in_ctrl"].sum()),
    }
    s["significant_genes"] = _significant(per_pert, methods)
    if "top_de_median_effect_over_ctrl_sd" in per_pert:
        s["top_de_effect_over_ctrl_sd"] = quartiles(
            per_pert["top_de_median_effect_over_ctrl_sd"].to_numpy(dtype=float)
        )
        s["top_de_frac_effect_gt_ctrl_sd"] = quartiles(
            per_pert["top_de_frac_effect_gt_ctrl_sd"].to_numpy(dtype=float)
        )
    s["variance"] = _variance(per_gene)
    s["mean_variance"] = _mean_variance(per_gene, kind)
    return s


def _significant(per_pert: pd.DataFrame, methods: list[str]) -> dict[str, Any]:
    """Per DE method: quartiles of the significant-gene counts, extremes, target genes."""
    sig: dict[str, Any] = {}
    for m in methods:
        col = f"n_significant_{m}"
        t = per_pert[per_pert["tested"]].sort_values(col, ascending=False)
        q = quartiles(t[col].to_numpy(dtype=float))
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
    return sig


def _variance(per_gene: pd.DataFrame) -> dict[str, Any]:
    """Variance between vs within perturbation groups, overall and per gene."""
    tot = float(per_gene["ss_total"].sum())
    return {
        "fraction_between_overall": float(per_gene["ss_between"].sum() / tot) if tot else None,
        "fraction_within_overall": float(per_gene["ss_within"].sum() / tot) if tot else None,
        "fraction_between_per_gene": quartiles(per_gene["frac_between"].to_numpy()),
        "n_genes_between_gt_0.01": int((per_gene["frac_between"] > 0.01).sum()),
        "n_genes_between_gt_0.1": int((per_gene["frac_between"] > 0.1).sum()),
        "median_var_ctrl": float(np.nanmedian(per_gene["var_ctrl"])),
        "median_within_var_perturbed": float(np.nanmedian(per_gene["mean_within_var_perturbed"])),
        "median_var_of_group_means": float(np.nanmedian(per_gene["var_of_group_means"])),
    }


def _mean_variance(per_gene: pd.DataFrame, kind: str) -> dict[str, Any]:
    """Mean–variance in control cells: over-dispersion relative to Poisson."""
    expressed = per_gene["ctrl_mean_input"] > 0
    phi = per_gene.loc[expressed, "overdispersion_phi"].to_numpy(dtype=float)
    return {
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
