"""CLI commands: ``celltune annotate train | predict | evaluate`` and ``celltune map``."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from celltune.cli import finetune_options as ft

annotate_app = typer.Typer(
    name="annotate",
    help=(
        "Cell-type annotation: fine-tune a classifier on a labelled reference (scGPT's CLS "
        "objective), label a query, score it."
    ),
    no_args_is_help=True,
)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    logging.getLogger("celltune").setLevel(logging.INFO)
    for noisy in ("numba", "pynndescent", "fontTools", "celltypist"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# long: a typer command; 48 of its lines declare its 28 parameters, 30 map them to config keys
@annotate_app.command("train", no_args_is_help=True)
def train_cmd(
    reference: Path = typer.Argument(..., help="Labelled reference .h5ad, raw counts in X."),
    label_key: str = typer.Option(..., "--label-key", help="obs column with the cell types."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (model in OUT/model)."),
    batch_key: str | None = typer.Option(
        None, "--batch-key", help="obs column of batches (needed for --dab-weight)."
    ),
    pretrained: Path | None = typer.Option(
        None, "--pretrained", help="scGPT-format model directory to fine-tune from."
    ),
    finetune: str | None = ft.FINETUNE,
    lora_rank: int | None = ft.LORA_RANK,
    lora_alpha: float | None = ft.LORA_ALPHA,
    lora_targets: str | None = ft.LORA_TARGETS,
    freeze_layers: int | None = ft.FREEZE_LAYERS,
    epochs: int = typer.Option(
        10, "--epochs", help="Epochs (default 10, as in the scGPT tutorial)."
    ),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate."),
    batch_size: int = typer.Option(32, "--batch-size", help="Mini-batch size."),
    max_steps: int | None = typer.Option(
        None, "--max-steps-per-epoch", help="Cap on optimizer steps per epoch (quick runs)."
    ),
    patience: int = typer.Option(3, "--patience", help="Epochs without macro-F1 gain."),
    balanced: bool = typer.Option(
        False, "--balanced", help="Class-balanced sampling (each type equally often)."
    ),
    mlm_weight: float = typer.Option(
        0.0, "--mlm-weight", help="Add masked-expression MSE (needs --mask-ratio)."
    ),
    mask_ratio: float = typer.Option(0.0, "--mask-ratio", help="Masked input fraction."),
    dab_weight: float = typer.Option(0.0, "--dab-weight", help="Add DAB (needs --batch-key)."),
    n_hvg: int | None = typer.Option(None, "--n-hvg", help="Keep N variable genes (default all)."),
    max_seq_len: int = typer.Option(3001, "--max-seq-len", help="Tokens per cell incl. <cls>."),
    d_model: int = typer.Option(128, "--d-model", help="Width (no --pretrained)."),
    nlayers: int = typer.Option(4, "--nlayers", help="Transformer layers (no --pretrained)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    set_: list[str] | None = typer.Option(
        None,
        "--set",
        metavar="KEY=VALUE",
        help="Any config key, key=value or section.key=value, applied last (repeatable).",
    ),
) -> None:
    """Fine-tune a cell-type classifier (CE on the cell embedding) on a labelled reference.

    The best epoch by macro-F1 on a 10% validation split of the reference is kept.

    Example:

      celltune annotate train ref.h5ad --label-key cell_type --out runs/annot

      celltune annotate train ref.h5ad --label-key cell_type --out runs/lora \\
          --pretrained scGPT_human/ --finetune lora
    """
    from celltune.data import io
    from celltune.tasks.annotation import AnnotationConfig, train_annotation
    from celltune.tasks.config import apply_overrides

    _setup_logging()
    cfg = {
        "label_key": label_key,
        "batch_key": batch_key,
        "pretrained": None if pretrained is None else str(pretrained),
        "balanced": balanced,
        "mlm_weight": mlm_weight,
        "mask_ratio": mask_ratio,
        "dab_weight": dab_weight,
        "n_hvg": n_hvg,
        "max_seq_len": max_seq_len,
        "d_model": d_model,
        "d_hid": d_model,
        "nlayers": nlayers,
        "train": {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "max_steps_per_epoch": max_steps,
            "patience": patience,
            "device": device,
            "seed": seed,
            "quiet": quiet,
        },
    }
    config = apply_overrides(
        AnnotationConfig.from_dict(cfg),
        ft.finetune_overrides(finetune, lora_rank, lora_alpha, lora_targets, freeze_layers),
    )
    config = apply_overrides(config, list(set_ or []))
    res = train_annotation(io.read_h5ad(reference), config, out, resume=resume)
    typer.echo(
        f"wrote {res.model_dir}: {len(res.labels)} cell types, best epoch {res.best_epoch} "
        f"(validation macro-F1 {res.best_macro_f1:.3f})"
    )


@annotate_app.command("predict", no_args_is_help=True)
def predict_cmd(
    query: Path = typer.Argument(..., help="Query .h5ad (counts in X)."),
    model: Path = typer.Option(..., "--model", help="Model directory from annotate train."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad with the labels."),
    min_confidence: float = typer.Option(
        0.0, "--min-confidence", help="Below this softmax maximum the label is 'unknown'."
    ),
    label_key: str | None = typer.Option(
        None, "--label-key", help="True labels in the query (default: the training column)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Cells per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Label a query: obs['celltune_label'], obs['celltune_confidence'], obsm['celltune_proba'].

    When the query carries true labels, OUT_report/ gets metrics, a confusion plot and
    report.html.

    Example:

      celltune annotate predict query.h5ad --model runs/annot/model --out query_labelled.h5ad
    """
    from celltune.report.annotation_run import report_dir_for, run_predict

    _setup_logging()
    res, scores = run_predict(
        query,
        model,
        out,
        label_key=label_key,
        min_confidence=min_confidence,
        batch_size=batch_size,
        device=device,
        quiet=quiet,
    )
    unknown = int((res.obs["celltune_label"] == "unknown").sum())
    typer.echo(f"wrote {out}: {res.n_obs:,} cells labelled ({unknown:,} unknown)")
    if scores is not None:
        typer.echo(
            f"accuracy {scores.accuracy:.3f}, macro-F1 {scores.macro_f1:.3f}; report in "
            f"{report_dir_for(out)}/report.html"
        )


@annotate_app.command("evaluate", no_args_is_help=True)
def evaluate_cmd(
    predicted: Path = typer.Argument(..., help=".h5ad written by annotate predict or map."),
    label_key: str = typer.Option(..., "--label-key", help="obs column with the true labels."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory."),
) -> None:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion plot and report.html.

    Example:

      celltune annotate evaluate query_labelled.h5ad --label-key cell_type --out annot_report
    """
    from celltune.data import io
    from celltune.report.annotation_run import evaluate_predictions

    _setup_logging()
    scores = evaluate_predictions(io.read_h5ad(predicted), label_key, out)
    typer.echo(
        f"accuracy {scores.accuracy:.3f}, macro-F1 {scores.macro_f1:.3f} on "
        f"{scores.n_scored:,} cells; report in {out}/report.html"
    )


def map_cmd(
    query: Path = typer.Argument(..., help="Query .h5ad (counts in X)."),
    reference: Path = typer.Option(..., "--reference", help="Labelled reference .h5ad."),
    model: Path = typer.Option(..., "--model", help="Any scGPT-format model directory."),
    label_key: str = typer.Option(..., "--label-key", help="Reference obs column to transfer."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad with the labels."),
    k: int = typer.Option(10, "--k", help="Neighbours per query cell."),
    min_confidence: float = typer.Option(
        0.0, "--min-confidence", help="Below this confidence the label is 'unknown'."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Cells per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Reference mapping: embed query and reference with one model, transfer labels by kNN.

    Works zero-shot from any model directory. Confidence = distance-weighted vote share ×
    exp(-mean neighbour distance / typical reference neighbour distance). When the query
    has the --label-key column, OUT_report/ gets the evaluation.

    Example:

      celltune map query.h5ad --reference ref.h5ad --model scGPT_human --label-key L -o m.h5ad
    """
    from celltune.data import io
    from celltune.report.annotation_run import evaluate_predictions, report_dir_for
    from celltune.tasks.annotation import map_labels

    _setup_logging()
    res = map_labels(
        io.read_h5ad(query),
        io.read_h5ad(reference),
        model,
        label_key,
        k=k,
        min_confidence=min_confidence,
        batch_size=batch_size,
        device=device,
        quiet=quiet,
    )
    io.write_h5ad(res, out)
    typer.echo(f"wrote {out}: {res.n_obs:,} cells labelled by {k}-NN")
    if label_key in res.obs.columns and label_key != "celltune_label":
        scores = evaluate_predictions(res, label_key, report_dir_for(out), title="celltune map")
        typer.echo(
            f"accuracy {scores.accuracy:.3f}, macro-F1 {scores.macro_f1:.3f}; report in "
            f"{report_dir_for(out)}/report.html"
        )


def register(app: typer.Typer) -> None:
    """Attach ``annotate`` (group) and ``map`` to the root app."""
    app.add_typer(annotate_app, name="annotate")
    app.command("map", no_args_is_help=True)(map_cmd)
