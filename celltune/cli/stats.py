"""CLI command: ``celltune stats`` (zeros, DE counts and variance of perturbation data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


# long: a typer command; most of its lines declare its options
def stats(
    data: Path = typer.Argument(..., help="Perturb-seq .h5ad (raw counts or log-normalised)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    condition_key: str = typer.Option("condition", help="obs column with the conditions."),
    control: str = typer.Option("ctrl", help="Condition value of the control cells."),
    layer: str = typer.Option(None, help="Use this layer instead of X."),
    pval: float = typer.Option(0.05, help="Benjamini–Hochberg adjusted p-value threshold."),
    min_lfc: float = typer.Option(0.0, help="Also require |log2 fold change| above this."),
    methods: str = typer.Option("wilcoxon,t-test", help="Comma-separated scanpy DE methods."),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Read DATA (.h5ad or .zarr, CSR) chunk by chunk instead of loading it: moment "
        "figures are exact; DE tests use at most --de-max-cells cells per group.",
    ),
    chunk_rows: int = typer.Option(20000, "--chunk-rows", help="Rows per chunk read."),
    de_max_cells: int | None = typer.Option(
        None,
        "--de-max-cells",
        help="DE tests on a seeded subsample of at most this many cells per group (control "
        "included); default all cells, 5000 with --stream.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the split halves and DE subsample."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the statistics of another input in DIR."
    ),
) -> None:
    """Answer: how many zeros, how many genes change per perturbation, how much variance.

    Writes DIR/stats.json, per_perturbation.csv, per_gene.csv, PNG plots and report.html
    (statistics of another input already in DIR are kept unless --overwrite).

    Example: celltune stats data.h5ad --condition-key condition --control ctrl --out stats/

    A file larger than memory (--stream): zeros, means, variances and the variance
    decomposition are accumulated over row chunks and equal the in-memory figures; the DE
    tests run per perturbation against control, each group a seeded subsample of at most
    --de-max-cells cells (stats.json: de_cells says which were subsampled).

    Example: celltune stats big.h5ad --stream --de-max-cells 5000 --out stats/
    """
    from celltune.analysis.perturbation_summary import report_sentences
    from celltune.errors import CelltuneError
    from celltune.report.stats_report import open_stats_dir, write_stats

    if stream and de_max_cells is None:
        de_max_cells = 5000
    try:
        with open_stats_dir(out, data, overwrite) as inputs:  # lock; another input's kept
            result = _compute(
                data,
                stream,
                condition_key=condition_key,
                control=control,
                layer=layer,
                pval=pval,
                min_lfc=min_lfc,
                methods=[m for m in methods.split(",") if m.strip()],
                chunk_rows=chunk_rows,
                de_max_cells=de_max_cells,
                seed=seed,
            )
            write_stats(result, out, inputs=inputs)
    except CelltuneError as err:
        typer.secho(f"Error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    for sentence in report_sentences(result.summary).values():
        typer.echo(sentence)
    typer.echo(result.summary["systematic_variation"]["reading"])
    sub = result.summary["de_cells"].get("subsampled_groups") or {}
    if sub:
        typer.echo(
            f"DE tests used a seeded subsample of at most {de_max_cells:,} cells in "
            f"{len(sub)} group(s) (stats.json: de_cells); all other figures use every cell."
        )
    typer.echo(f"wrote {out}/stats.json, per_perturbation.csv, per_gene.csv, report.html")


def _compute(data: Path, stream: bool, **kw: Any) -> Any:
    """Read (or open, ``stream``) and validate the input, then compute the statistics."""
    from celltune.analysis.perturbation_stats import compute_perturbation_stats
    from celltune.data.io import read_h5ad
    from celltune.data.source import StoreSource
    from celltune.data.validate import check_source_names, validate_input

    if stream:
        source: Any = StoreSource(data, kw["layer"])
        check_source_names(source)  # what validate_input checks in memory
    else:
        source = read_h5ad(data)
        validate_input(source, where=str(data))
    return compute_perturbation_stats(source, **kw)


def register(app: typer.Typer) -> None:
    """Attach ``stats`` to the root app."""
    app.command("stats")(stats)
