"""CLI commands ``celltune integrate`` (fine-tune + evaluate + report) and ``celltune embed``.

The command is a thin wrapper around :func:`celltune.report.integration_run.run_integrate`
(also exported as ``celltune.run_integrate``), the same workflow as a Python function.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from celltune.cli import finetune_options as ft

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

INTEGRATE_EXAMPLES = """
Examples:

  celltune integrate data.h5ad --batch-key batch --label-key cell_type \\
      --out runs/demo

  celltune integrate data.h5ad --batch-key batch --label-key cell_type \\
      --out runs/demo --config examples/integrate.yaml --epochs 10 \\
      --max-seq-len 601 --baselines pca,harmony

  celltune integrate data.h5ad --batch-key batch --out runs/demo --resume

  celltune integrate data.h5ad --batch-key batch --out runs/ft \\
      --pretrained scGPT_human/

  celltune integrate data.h5ad --batch-key batch --out runs/lora \\
      --pretrained scGPT_human/ --finetune lora --lora-rank 8

  celltune integrate atlas.h5ad --batch-key donor --out runs/atlas --stream

  celltune integrate data.h5ad --batch-key batch --out runs/ddp --devices 2

--resume continues after a stop, --stream reads an .h5ad larger than memory, --devices 2
trains on 2 DDP processes. Any config key can be set with --set section.key=value
(repeatable), e.g. --set model.d_model=64 --set data.n_hvg=600. Precedence: defaults <
--config YAML < --set < the named options.
"""

EMBED_EXAMPLES = """
Examples:

  celltune embed data.h5ad --model runs/demo/model --out emb.h5ad \\
      --batch-key batch

  celltune embed pbmc.h5ad --model scGPT_human/ --out emb.h5ad --batch-size 32

  celltune embed atlas.h5ad --model runs/atlas/model --out emb.h5ad --stream
"""


# ----------------------------------------------------------------------------- helpers
def _setup_logging(quiet: bool) -> None:
    """INFO logs to stderr unless the application configured logging already."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    logging.getLogger("celltune").setLevel(logging.INFO)
    for noisy in ("jax", "absl", "numba", "pynndescent", "lightning", "scvi", "fontTools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _ = quiet  # --quiet keeps the log lines and drops the progress bars (tqdm disable)


def _parse_baselines(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none", "no", "off"):
        return []
    return [b.strip().lower() for b in text.split(",") if b.strip()]


# ----------------------------------------------------------------------------- commands
# long: a typer command; most of its lines declare its 35 parameters and map them to config keys
def integrate_cmd(
    data: Path = typer.Argument(
        ..., help="Input .h5ad, raw counts in X (or --set data.layer=NAME)."
    ),
    batch_key: str | None = typer.Option(
        None, "--batch-key", help="obs column naming each cell's batch (required)."
    ),
    label_key: str | None = typer.Option(
        None, "--label-key", help="obs column with cell types (enables the scIB metrics)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML config (see examples/integrate.yaml)."
    ),
    pretrained: Path | None = typer.Option(
        None, "--pretrained", help="scGPT-format model directory to fine-tune from."
    ),
    finetune: str | None = ft.FINETUNE,
    lora_rank: int | None = ft.LORA_RANK,
    lora_alpha: float | None = ft.LORA_ALPHA,
    lora_targets: str | None = ft.LORA_TARGETS,
    freeze_layers: int | None = ft.FREEZE_LAYERS,
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Use --pretrained weights covering < 90% of the model."
    ),
    epochs: int | None = typer.Option(
        None,
        "--epochs",
        help="Epochs (default: a 1,200-step budget from scratch, 30 with --pretrained).",
    ),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default auto)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Mini-batch (default 64)."),
    max_seq_len: int | None = typer.Option(
        None,
        "--max-seq-len",
        help="Tokens per cell incl. <cls> (default 601 from scratch, 1201 with --pretrained).",
    ),
    grad_accum: int | None = typer.Option(
        None, "--grad-accum", help="Mini-batches per optimizer step (default 1)."
    ),
    amp: str | None = typer.Option(
        None, "--amp", help="Mixed precision: auto (fp16 on GPU) | off | bf16 | fp16."
    ),
    eval_cells: int | None = typer.Option(
        None, "--eval-cells", help="Cells used for baselines/metrics/UMAPs (default all)."
    ),
    baselines: str | None = typer.Option(
        None, "--baselines", help="Comma list of pca,harmony,scvi, or 'none'."
    ),
    n_hvg: int | None = typer.Option(None, "--n-hvg", help="Highly variable genes (default 1200)."),
    lr: float | None = typer.Option(
        None, "--lr", help="Learning rate (default 1e-3 from scratch, 1e-4 with --pretrained)."
    ),
    layer: str | None = typer.Option(None, "--layer", help="Read raw counts from this layer."),
    not_raw: bool = typer.Option(
        False, "--not-raw", help="X is already normalised + log1p (skip normalise/log1p)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from OUT/checkpoint.pt after an interruption."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Logs only, no progress bars."),
    no_dab: bool = typer.Option(False, "--no-dab", help="No adversarial batch discriminator."),
    no_dsbn: bool = typer.Option(False, "--no-dsbn", help="No domain-specific batch norm."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of every random choice (default 0)."
    ),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Stream rows from the .h5ad on disk (memory flat in the number of cells).",
    ),
    stream_sample_cells: int | None = typer.Option(
        None,
        "--stream-sample-cells",
        help="With --stream: cells sampled to pick HVGs (default 50000).",
    ),
    chunk_size: int | None = typer.Option(
        None, "--chunk-size", help="With --stream: rows per contiguous read (default 1024)."
    ),
    buffer_chunks: int | None = typer.Option(
        None, "--buffer-chunks", help="With --stream: chunks per shuffle window (default 8)."
    ),
    devices: int | None = typer.Option(
        None,
        "--devices",
        help="Train on N processes (DDP via torchrun; one GPU each, or CPU cores shared).",
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Any config key: section.key=value (repeatable)."
    ),
) -> None:
    """Fine-tune a scGPT-architecture model for batch integration and evaluate it.

    Preprocesses the data, holds out 10% of cells (per batch) for validation, fine-tunes
    with the full scGPT integration objective (MLM, zero-prob, GEPC, ECS, DAB; DSBN),
    embeds every cell, and compares against PCA / Harmony / scVI with scIB metrics.
    Writes OUT/integrated.h5ad, model/, metrics.json, history.csv, config.yaml,
    umap_*.png and report.html.
    """
    from celltune.cli.launch import relaunch_under_torchrun
    from celltune.data.io import read_h5ad
    from celltune.tasks.config import apply_overrides
    from celltune.tasks.integration import IntegrationConfig
    from celltune.train import distributed as dist_utils

    _setup_logging(quiet)
    code = relaunch_under_torchrun(devices, device)
    if code is not None:
        raise typer.Exit(code)
    cfg = IntegrationConfig.load(config)
    cfg = apply_overrides(cfg, list(set_ or []))
    flags: dict[str, Any] = {
        "data.batch_key": batch_key,
        "data.label_key": label_key,
        "data.n_hvg": n_hvg,
        "data.layer": layer,
        "data.data_is_raw": False if not_raw else None,
        "model.pretrained": None if pretrained is None else str(pretrained),
        "model.allow_partial": True if allow_partial else None,
        "train.epochs": epochs,
        "train.device": device,
        "train.batch_size": batch_size,
        "train.grad_accum": grad_accum,
        "train.amp": amp,
        "train.lr": lr,
        "train.seed": seed,
        "tokens.max_seq_len": max_seq_len,
        "eval.eval_cells": eval_cells,
        "eval.baselines": _parse_baselines(baselines),
        "train.quiet": True if quiet else None,
        "model.dab": False if no_dab else None,
        "model.dsbn": False if no_dsbn else None,
        "data.stream": True if stream else None,
        "data.stream_sample_cells": stream_sample_cells,
        "data.chunk_size": chunk_size,
        "data.buffer_chunks": buffer_chunks,
        **ft.finetune_overrides(finetune, lora_rank, lora_alpha, lora_targets, freeze_layers),
    }
    cfg = apply_overrides(cfg, flags)
    cfg.validate()
    from celltune.report.integration_run import run_integrate

    result = run_integrate(data if cfg.data.stream else read_h5ad(data), cfg, out, resume=resume)
    if not dist_utils.is_main_process():
        return
    if result.metrics is not None:
        # the total is 0.6 * scib_bio + 0.4 * scib_batch (avg_bio/avg_batch: metrics.json)
        cols = [c for c in ("scib_bio", "scib_batch", "scib_total") if c in result.metrics]
        typer.echo(result.metrics[cols].round(3).rename_axis(None).to_string())
    typer.echo(f"wrote {out}/ (report.html, metrics.json, integrated.h5ad, model/)")


def embed_cmd(
    data: Path = typer.Argument(..., help="Input .h5ad (raw counts or normalised values)."),
    model: Path = typer.Option(..., "--model", "-m", help="Model directory (scGPT format)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad with obsm['X_celltune']."),
    batch_key: str | None = typer.Option(
        None, "--batch-key", help="obs column with batches (for DSBN / batch-label models)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Cells per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    layer: str | None = typer.Option(None, "--layer", help="Read values from this layer."),
    gene_column: str | None = typer.Option(
        None, "--gene-column", help="var column with gene symbols (default var_names)."
    ),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", help="Tokens per cell (default: the model's, else 1201)."
    ),
    key: str = typer.Option("X_celltune", "--key", help="obsm key of the embedding."),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Stream rows from disk; OUT holds obs, var and the embedding (no X).",
    ),
    chunk_size: int = typer.Option(1024, "--chunk-size", help="With --stream: rows per read."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Logs only, no progress bars."),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Load weights covering < 90% of the model (reported)."
    ),
) -> None:
    """Cell embeddings from any model directory (zero-shot), batched, L2-normalised.

    Genes are matched to the model's vocabulary by name; the embedding of a cell does
    not depend on --batch-size.
    """
    from celltune.data.io import read_h5ad, write_h5ad
    from celltune.errors import InputError
    from celltune.tasks.integration import embed

    _setup_logging(quiet)
    if out.suffix != ".h5ad":
        raise InputError(f"--out must end in .h5ad (got {out}); e.g. --out {out.stem}.h5ad")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda (got {device!r})")
    from celltune.data.validate import check_out_not_input

    check_out_not_input(out, [data])
    kw: dict[str, Any] = {
        "batch_key": batch_key,
        "batch_size": batch_size,
        "device": device,
        "key": key,
        "layer": layer,
        "gene_column": gene_column,
        "max_seq_len": max_seq_len,
        "quiet": quiet,
        "allow_partial": allow_partial,
    }
    if stream:
        from celltune.tasks.integration import embed_file

        embed_file(data, model, out, chunk_size=chunk_size, **kw)
        typer.echo(f"wrote {out}: obsm[{key!r}] (streamed from {data})")
        return
    res = embed(read_h5ad(data), model, **kw)
    write_h5ad(res, out)
    typer.echo(f"wrote {out}: obsm[{key!r}] {res.obsm[key].shape[0]:,} × {res.obsm[key].shape[1]}")


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    app.command(
        "integrate",
        help=inspect.cleandoc(integrate_cmd.__doc__ or "") + "\n" + INTEGRATE_EXAMPLES,
        short_help="Fine-tune for batch integration; scIB metrics vs PCA/Harmony/scVI.",
        no_args_is_help=True,
    )(integrate_cmd)
    app.command(
        "embed",
        help=inspect.cleandoc(embed_cmd.__doc__ or "") + "\n" + EMBED_EXAMPLES,
        short_help="Zero-shot cell embeddings from a model directory.",
        no_args_is_help=True,
    )(embed_cmd)
