"""CLI command: ``celltune stats`` (zeros, DE counts and variance of perturbation data)."""

from __future__ import annotations

from pathlib import Path

import typer


def stats(
    data: Path = typer.Argument(..., help="Perturb-seq .h5ad (raw counts or log-normalised)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    condition_key: str = typer.Option("condition", help="obs column with the conditions."),
    control: str = typer.Option("ctrl", help="Condition value of the control cells."),
    layer: str = typer.Option(None, help="Use this layer instead of X."),
    pval: float = typer.Option(0.05, help="Benjamini–Hochberg adjusted p-value threshold."),
    min_lfc: float = typer.Option(0.0, help="Also require |log2 fold change| above this."),
    methods: str = typer.Option("wilcoxon,t-test", help="Comma-separated scanpy DE methods."),
) -> None:
    """Answer: how many zeros, how many genes change per perturbation, how much variance.

    Writes DIR/stats.json, per_perturbation.csv, per_gene.csv, PNG plots and report.html.
    Example: celltune stats data.h5ad --condition-key condition --control ctrl --out stats/
    """
    from celltune.analysis.perturbation_stats import (
        compute_perturbation_stats,
        report_sentences,
    )
    from celltune.data.io import read_h5ad
    from celltune.errors import CelltuneError
    from celltune.report.stats_report import write_stats

    try:
        from celltune.data.validate import validate_input

        adata = read_h5ad(data)
        validate_input(adata, where=str(data))
        result = compute_perturbation_stats(
            adata,
            condition_key=condition_key,
            control=control,
            layer=layer,
            pval=pval,
            min_lfc=min_lfc,
            methods=[m for m in methods.split(",") if m.strip()],
        )
        write_stats(result, out)
    except CelltuneError as err:
        typer.secho(f"Error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    for sentence in report_sentences(result.summary).values():
        typer.echo(sentence)
    typer.echo(result.summary["systematic_variation"]["reading"])
    typer.echo(f"wrote {out}/stats.json, per_perturbation.csv, per_gene.csv, report.html")


def register(app: typer.Typer) -> None:
    """Attach ``stats`` to the root app."""
    app.command("stats")(stats)
