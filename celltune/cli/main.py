"""The ``celltune`` command line: one typer app, one module per command group."""

from __future__ import annotations

import sys

import typer

from celltune.cli import annotate, integrate, model, perturb, preprocess, stats

app = typer.Typer(
    name="celltune",
    help=(
        "Fine-tune scGPT-architecture single-cell transformers: preprocessing, batch "
        "integration, perturbation response prediction, data statistics and scGPT "
        "checkpoint reuse.\n\nRun 'celltune COMMAND --help' for a command's options and examples."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (preprocess, integrate, perturb, stats, model, annotate):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn celltune's own errors into one clear line."""
    from celltune.errors import CelltuneError

    try:
        app(args=argv, standalone_mode=True)
    except CelltuneError as err:  # raised outside click's own handling
        typer.secho(f"Error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
