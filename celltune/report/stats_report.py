"""Files of ``celltune stats``: ``stats.json``, the two CSV tables, PNG plots, ``report.html``.

The figures come from ``celltune.analysis.perturbation_stats`` (analysis computes); this
module only writes and draws them (report draws).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from celltune.analysis.perturbation_stats import PerturbationStats
from celltune.analysis.perturbation_summary import report_sentences
from celltune.files import (
    RunLock,
    atomic_path,
    claim_outputs,
    clean_orphan_temps,
    input_record,
    write_json_atomic,
    write_manifest,
)
from celltune.report import stats_plots
from celltune.report.html import Section, write_report

#: what ``stats`` writes into its directory (removed before the next run's files)
STATS_FILES = ("stats.json", "per_perturbation.csv", "per_gene.csv", "*.png", "report.html")


@contextlib.contextmanager
def open_stats_dir(
    out_dir: str | os.PathLike[str], data: str | os.PathLike[str], overwrite: bool
) -> Iterator[dict[str, object]]:
    """Own ``out_dir`` while the statistics of ``data`` are computed and written (a second
    run into it is refused); the statistics of another input there are kept unless
    ``overwrite``. Yields the input record for :func:`write_stats`."""
    from celltune.data.io import check_h5ad_path
    from celltune.errors import InputError

    if not Path(data).exists():  # the reader's message, before a directory is made
        check_h5ad_path(Path(data))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file; give a directory path for stats")
    with RunLock(out):
        clean_orphan_temps(out)
        inputs = input_record(data=data)
        claim_outputs(
            out, "stats", inputs, overwrite=overwrite, marker="stats.json", patterns=STATS_FILES
        )
        yield inputs


def write_stats(
    result: PerturbationStats,
    out_dir: str | os.PathLike[str],
    inputs: dict[str, object] | None = None,
) -> dict[str, Path]:
    """Write stats.json, per_perturbation.csv, per_gene.csv, PNG plots, report.html and,
    last, manifest.json (``inputs``: what they were computed from, see ``input_record``)."""
    with RunLock(out_dir):
        paths = _write_stats(result, Path(out_dir))
        write_manifest(out_dir, "stats", inputs or {}, list(paths.values()))
    return paths


def _write_stats(result: PerturbationStats, out: Path) -> dict[str, Path]:
    """The files of :func:`write_stats`."""
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
