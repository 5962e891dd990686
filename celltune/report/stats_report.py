"""Files of ``celltune stats``: ``stats.json``, the two CSV tables, PNG plots, ``report.html``.

The figures come from ``celltune.analysis.perturbation_stats`` (analysis computes); this
module only writes and draws them (report draws).
"""

from __future__ import annotations

import os
from pathlib import Path

from celltune.analysis.perturbation_stats import PerturbationStats
from celltune.analysis.perturbation_summary import report_sentences
from celltune.files import atomic_path, write_json_atomic
from celltune.report import stats_plots
from celltune.report.html import Section, write_report


def write_stats(result: PerturbationStats, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write stats.json, per_perturbation.csv, per_gene.csv, PNG plots and report.html."""
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
