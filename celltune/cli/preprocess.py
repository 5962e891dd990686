"""CLI command ``celltune preprocess``: raw .h5ad → model-ready .h5ad (SPEC §1)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer

EXAMPLES = """
Examples:

  celltune preprocess pbmc.h5ad --out pbmc_pp.h5ad --batch-key batch

  celltune preprocess pbmc.h5ad --out pbmc_pp.h5ad --n-hvg 2000 --n-bins 51 --layer counts

  celltune preprocess lognorm.h5ad --out pp.h5ad --not-raw  # X is log1p already

  celltune preprocess pbmc.h5ad --out pp.h5ad --config preprocess.yaml

The YAML config holds PreprocessConfig fields (optionally under a 'preprocess:' key), e.g.
'n_hvg: 2000' and 'batch_key: batch'; options given on the command line win.
"""


def _load_config(path: Path | None) -> dict[str, Any]:
    """Read the YAML config; unknown keys are rejected by PreprocessConfig.replace."""
    if path is None:
        return {}
    import yaml

    from celltune.errors import InputError

    if not path.is_file():
        raise InputError(f"config file not found: {path}; check the --config path")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not valid YAML ({err}); fix the syntax") from err
    if isinstance(obj, dict) and isinstance(obj.get("preprocess"), dict):
        obj = obj["preprocess"]
    if not isinstance(obj, dict):
        raise InputError(f"{path} must hold a mapping of preprocess options, e.g. 'n_hvg: 1200'")
    return dict(obj)


def preprocess_cmd(
    input: Path = typer.Argument(..., help="Input .h5ad with raw counts in X (or --layer)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad (written atomically)."),
    n_hvg: int | None = typer.Option(
        None, "--n-hvg", help="Highly variable genes to keep (default 1200; 0 = all genes)."
    ),
    n_bins: int | None = typer.Option(None, "--n-bins", help="Value bins (default 51)."),
    batch_key: str | None = typer.Option(
        None, "--batch-key", help="obs column with batch labels (batch-aware HVG selection)."
    ),
    layer: str | None = typer.Option(
        None, "--layer", help="Read counts from this layer instead of X."
    ),
    not_raw: bool = typer.Option(
        False,
        "--not-raw",
        help="Input is already normalised + log1p: skip normalize/log1p and count checks.",
    ),
    filter_gene_by_counts: int | None = typer.Option(
        None, "--filter-gene-by-counts", help="Drop genes with fewer total counts (default 3)."
    ),
    filter_cell_by_counts: int | None = typer.Option(
        None, "--filter-cell-by-counts", help="Drop cells with fewer total counts (default off)."
    ),
    hvg_flavor: str | None = typer.Option(
        None, "--hvg-flavor", help="seurat_v3 | cell_ranger | seurat (default: auto)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for binning ties (default 0)."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML file with PreprocessConfig fields."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Filter, normalise, log1p, select HVGs and bin an .h5ad.

    The output keeps raw counts in layers['counts'], the normalised log1p values in X and
    layers['X_normed'], the bins in layers['X_binned'], var['highly_variable'] and the
    parameters in uns['celltune']['preprocess'].
    """
    import time

    from celltune.data.io import read_h5ad, write_h5ad
    from celltune.data.preprocess import PreprocessConfig, preprocess
    from celltune.errors import InputError

    t0 = time.perf_counter()
    cli_values = {
        "n_hvg": n_hvg,
        "n_bins": n_bins,
        "batch_key": batch_key,
        "layer": layer,
        "filter_gene_by_counts": filter_gene_by_counts,
        "filter_cell_by_counts": filter_cell_by_counts,
        "hvg_flavor": hvg_flavor,
        "seed": seed,
    }
    settings = _load_config(config)
    settings.update({k: v for k, v in cli_values.items() if v is not None})
    if not_raw:
        settings["data_is_raw"] = False
    cfg = PreprocessConfig().replace(**settings)
    cfg.validate()
    if out.suffix != ".h5ad":
        raise InputError(f"--out must end in .h5ad (got {out}); e.g. --out {out.stem}.h5ad")

    from celltune.data.validate import check_out_not_input

    check_out_not_input(out, [input])
    adata = read_h5ad(input)
    result = preprocess(adata, cfg, quiet=quiet)
    write_h5ad(result, out)
    if quiet:
        return
    _echo_summary(result, cfg, input, out, time.perf_counter() - t0)


def _echo_summary(result: Any, cfg: Any, input: Path, out: Path, dt: float) -> None:
    """What was read, filtered, selected, binned and written (from uns['celltune'])."""
    info = result.uns["celltune"]["preprocess"]
    typer.echo(
        f"read      {info['n_cells_in']:,} cells × {info['n_genes_in']:,} genes from {input}\n"
        f"filtered  {info['n_genes_after_filter']:,} genes with >= "
        f"{cfg.filter_gene_by_counts or 0} counts, {info['n_cells']:,} cells\n"
        f"HVGs      {info['n_genes']:,} ({info['hvg_flavor_used']}"
        + (f", batch_key={cfg.batch_key}" if cfg.batch_key else "")
        + ")\n"
        f"binned    into {cfg.n_bins} bins (seed {cfg.seed})\n"
        f"wrote     {out}  (layers: {', '.join(result.layers.keys())}) in {dt:.1f} s"
    )


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    app.command(
        "preprocess",
        help=inspect.cleandoc(preprocess_cmd.__doc__ or "") + "\n" + EXAMPLES,
        short_help="Filter, normalise, select HVGs and bin an .h5ad for fine-tuning.",
        no_args_is_help=True,
    )(preprocess_cmd)
