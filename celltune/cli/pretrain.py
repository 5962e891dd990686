"""CLI command ``celltune pretrain``: label-free pretraining on one or many files.

A thin wrapper around :func:`celltune.tasks.pretrain.pretrain`; ``--devices N`` re-runs
the command under torchrun exactly as ``celltune integrate`` does (celltune/cli/launch.py).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer

PRETRAIN_EXAMPLES = """
Examples:

  celltune pretrain atlas1.h5ad atlas2.h5ad --out runs/pt

  celltune pretrain atlas*.h5ad --out runs/pt --vocab vocab.json --ecs

  celltune pretrain lab.h5ad --out runs/cont --init scGPT_human/

  celltune pretrain atlas1.h5ad atlas2.h5ad --out runs/pt --resume

  celltune pretrain atlas1.h5ad atlas2.h5ad --out runs/pt --devices 2

  celltune integrate data.h5ad --batch-key batch --out runs/ft \\
      --pretrained runs/pt/model

Rows are streamed from disk (memory flat in the number of cells). The vocabulary is the
union of the files' genes unless --vocab or --init gives one; --init appends the files'
new genes to its vocabulary unless --keep-vocab. Any config key can be set with --set
section.key=value (e.g. --set model.nlayers=12 --set data.max_cells=50000, per file).
"""


# long: a typer command; most of its lines declare its parameters, the rest map them
def pretrain_cmd(
    files: list[Path] = typer.Argument(..., help="Input .h5ad files (raw counts in X)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output (run) directory."),
    config: Path | None = typer.Option(None, "--config", help="YAML config (same tree)."),
    vocab: Path | None = typer.Option(
        None, "--vocab", help="vocab.json to use (default: the union of the files' genes)."
    ),
    init: Path | None = typer.Option(
        None, "--init", help="Model directory to continue pretraining (weights + vocab)."
    ),
    keep_vocab: bool = typer.Option(
        False, "--keep-vocab", help="With --init: train on its vocabulary's genes only."
    ),
    ecs: bool = typer.Option(False, "--ecs", help="Add the elastic cell-similarity term."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default 10)."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Budget in optimizer steps (epochs lowered to fit)."
    ),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default auto)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Mini-batch (default 64)."),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", help="Tokens per cell incl. <cls> (default 1201)."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default 1e-4)."),
    amp: str | None = typer.Option(None, "--amp", help="auto | off | bf16 | fp16."),
    layer: str | None = typer.Option(None, "--layer", help="Read counts from this layer."),
    gene_column: str | None = typer.Option(
        None, "--gene-column", help="var column with gene names (default var_names)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from OUT/checkpoint.pt after an interruption."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed (default 0)."),
    devices: int | None = typer.Option(
        None, "--devices", help="Train on N processes (DDP via torchrun)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Logs only, no progress bars."),
    set_: list[str] | None = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Any config key: section.key=value (repeatable)."
    ),
) -> None:
    """Pretrain a scGPT-architecture model without labels on one or many .h5ad files.

    Objective: masked expression MSE + zero probability and GEPC (optionally ECS); no
    batch labels, DAB or CLS. Writes OUT/model/ (scGPT format: args.json, vocab.json,
    best_model.pt), config.yaml, history.csv and checkpoint.pt (for --resume).
    """
    from celltune.cli.integrate import _setup_logging
    from celltune.cli.launch import relaunch_under_torchrun
    from celltune.tasks.config import apply_overrides
    from celltune.tasks.pretrain import PretrainConfig, pretrain
    from celltune.train import distributed as dist_utils

    _setup_logging(quiet)
    code = relaunch_under_torchrun(devices, device)
    if code is not None:
        raise typer.Exit(code)
    cfg = apply_overrides(PretrainConfig.load(config), list(set_ or []))
    flags: dict[str, Any] = {
        "pretrain.vocab": None if vocab is None else str(vocab),
        "model.pretrained": None if init is None else str(init),
        "pretrain.extend_vocab": False if keep_vocab else None,
        "objective.ecs_weight": 10.0 if ecs and cfg.objective.ecs_weight == 0 else None,
        "train.epochs": epochs,
        "train.max_steps": max_steps,
        "train.device": device,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "train.amp": amp,
        "train.seed": seed,
        "train.quiet": True if quiet else None,
        "tokens.max_seq_len": max_seq_len,
        "data.layer": layer,
        "data.gene_column": gene_column,
    }
    cfg = apply_overrides(cfg, flags)
    cfg.validate()
    result = pretrain(files, cfg, out, resume=resume)
    if dist_utils.is_main_process():
        h = result.history
        best = "nan" if h.best_metric is None else f"{h.best_metric:.4g}"
        typer.echo(
            f"pretrained on {result.n_cells:,} cells of {len(files)} file(s), "
            f"{result.vocab.ntoken:,} tokens; best {h.select_metric} {best} "
            f"(epoch {h.best_epoch})"
        )
        typer.echo(f"wrote {out}/model/ (scGPT format); fine-tune it with --pretrained {out}/model")


def register(app: typer.Typer) -> None:
    """Attach this module's command to the root app."""
    app.command(
        "pretrain",
        help=inspect.cleandoc(pretrain_cmd.__doc__ or "") + "\n" + PRETRAIN_EXAMPLES,
        short_help="Self-supervised pretraining on one or many .h5ad files.",
        no_args_is_help=True,
    )(pretrain_cmd)
