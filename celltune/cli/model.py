"""CLI commands: ``celltune model inspect DIR`` (what a model directory holds)."""

from __future__ import annotations

from pathlib import Path

import typer

model_app = typer.Typer(
    name="model",
    help="Inspect scGPT / celltune model directories (args.json, vocab.json, weights).",
    no_args_is_help=True,
)


@model_app.command("inspect")
def inspect(
    model_dir: Path = typer.Argument(..., help="Model directory (args.json, vocab.json, weights)."),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Load weights that cover < 90% of the model (reported)."
    ),
) -> None:
    """Print a model directory's architecture, parameter count and heads.

    Example: celltune model inspect ./scGPT_human
    """
    import dataclasses

    from celltune.model.checkpoint import load_model

    model = load_model(model_dir, allow_partial=allow_partial)
    c = model.config
    report = model.load_report
    kind = "TransformerGenerator (perturbation)" if c.generator else "TransformerModel"
    lines = [
        f"model directory : {model_dir}",
        f"architecture    : {kind}",
        f"size            : d_model={c.d_model} nhead={c.nhead} d_hid={c.d_hid} "
        f"nlayers={c.nlayers} vocab={c.ntoken}",
        f"parameters      : {model.num_parameters():,}",
        f"heads           : {', '.join(model.heads())}",
        f"input embedding : {c.input_emb_style}; cell embedding: {c.cell_emb_style}",
        f"batch handling  : batch labels={'yes' if c.use_batch_labels else 'no'}, "
        f"DSBN={c.domain_spec_batchnorm}, batches={c.num_batch_labels}",
        f"weights         : {report.summary() if report is not None else 'n/a'}",
        "settings        :",
    ]
    for field in dataclasses.fields(c):
        lines.append(f"  {field.name} = {getattr(c, field.name)!r}")
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    app.add_typer(model_app, name="model")
