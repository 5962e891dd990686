"""The ``celltune`` command line: one typer app, one module per command group."""

from __future__ import annotations

import sys

import typer

from celltune.cli import annotate, integrate, model, perturb, preprocess, pretrain, stats
from celltune.cli.help import CelltuneGroup

app = typer.Typer(
    name="celltune",
    cls=CelltuneGroup,
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


def version() -> str:
    """The installed celltune version (package metadata, else ``celltune.__version__``)."""
    from importlib import metadata

    try:
        return metadata.version("celltune")
    except metadata.PackageNotFoundError:
        import celltune

        return celltune.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"celltune {version()}")
        raise typer.Exit()


@app.callback()
def root(
    show_version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the celltune version and exit.",
    ),
) -> None:
    """Fine-tune scGPT-architecture single-cell transformers: preprocessing, batch
    integration, cell-type annotation, perturbation response prediction, data statistics
    and scGPT checkpoint reuse.

    Run 'celltune COMMAND --help' for a command's options and examples.
    """


for _module in (preprocess, integrate, pretrain, perturb, stats, model, annotate):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn celltune's own errors into one clear line."""
    from celltune.errors import CelltuneError

    try:
        app(args=argv, prog_name="celltune", standalone_mode=True)
    except CelltuneError as err:  # raised outside click's own handling
        typer.secho(f"Error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
