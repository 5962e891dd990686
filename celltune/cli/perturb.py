"""CLI commands: ``celltune perturb ...`` (GEARS-format perturbation data and models).

The sub-app ``perturb_app`` is shared: other modules add their commands to it with
``@perturb_app.command()``; ``register(app)`` mounts it once under ``perturb``.

Commands: ``prepare`` (GEARS layout, DE genes, splits), ``train`` / ``predict`` (the
perturbation-flag transformer, ``celltune.tasks.perturbation``) and ``evaluate``
(``celltune.report.perturbation_run.evaluate_perturbation_run``: GEARS/scGPT metrics,
baselines, plots, report).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from celltune.cli import finetune_options as ft

perturb_app = typer.Typer(
    name="perturb",
    help="Perturbation response prediction on GEARS-format Perturb-seq data.",
    no_args_is_help=True,
)
logger = logging.getLogger(__name__)


@perturb_app.command("prepare")
def prepare(
    raw: Path = typer.Argument(..., help="Perturb-seq .h5ad (raw counts unless --not-raw)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad in GEARS layout."),
    condition_key: str = typer.Option("condition", help="obs column with the conditions."),
    control: str = typer.Option("ctrl", help="Value of the condition column for control cells."),
    n_hvg: int = typer.Option(5000, help="Highly variable genes kept (all when fewer)."),
    split: str = typer.Option(
        "simulation",
        help="simulation, simulation_single, single, combo_seen0/1/2 (combo = seen0), no_test.",
    ),
    seed: int = typer.Option(1, help="Split seed (GEARS default 1)."),
    train_gene_set_size: float = typer.Option(0.75, help="Fraction of perturbed genes in train."),
    combo_seen2_train_frac: float = typer.Option(
        0.75, help="Fraction of combos with both genes seen that go to train."
    ),
    not_raw: bool = typer.Option(
        False, "--not-raw", help="X is already normalised + log1p: skip normalisation."
    ),
    bare_as_single: bool = typer.Option(
        False, "--bare-as-single", help="Read a bare 'GENE' condition as 'GENE+ctrl'."
    ),
) -> None:
    """Normalise, select HVGs, compute GEARS DE genes and a split; write DATA.h5ad.

    Reads RAW into memory (no --stream here); 'perturb train --stream' then trains on a
    prepared file larger than memory.

    Example: celltune perturb prepare raw.h5ad --out data.h5ad --split simulation
    """
    from celltune.data import gears
    from celltune.data.io import read_h5ad
    from celltune.errors import CelltuneError

    try:
        from celltune.data import validate

        validate.check_out_not_input(out, [raw])
        adata = read_h5ad(raw)
        validate.validate_input(adata, where=str(raw))
        prepared = gears.prepare_perturbation_data(
            adata,
            condition_key=condition_key,
            control=control,
            n_hvg=n_hvg,
            split=split,
            seed=seed,
            train_gene_set_size=train_gene_set_size,
            combo_seen2_train_frac=combo_seen2_train_frac,
            data_is_raw=not not_raw,
            bare_as_single=bare_as_single,
        )
        gears.write_prepared(prepared, out)
    except CelltuneError as err:
        typer.secho(f"Error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    counts = prepared.obs["split"].value_counts()
    groups: dict[str, int] = {}
    for g in prepared.uns["split_subgroups"].values():
        groups[g] = groups.get(g, 0) + 1
    missing = list(prepared.uns["perturbed_genes_missing"])
    typer.echo(
        f"wrote {out}: {prepared.n_obs:,} cells × {prepared.n_vars:,} genes, "
        f"{prepared.obs['condition'].nunique()} conditions"
    )
    typer.echo("split " + split + ": " + ", ".join(f"{k} {v:,} cells" for k, v in counts.items()))
    typer.echo("test perturbations: " + ", ".join(f"{k} {v}" for k, v in groups.items()))
    if missing:
        typer.echo(
            f"{len(missing)} perturbed genes not in the gene list (kept): {' '.join(missing)}"
        )


# ----------------------------------------------------------------------------- train / predict
# / evaluate (issue 5). Evaluation lives here, not in tasks, because the metrics, baselines
# and plots sit to the right of ``tasks`` (docs/ARCHITECTURE.md), as for ``integrate``.

TRAIN_EXAMPLES = """
Examples:

  celltune perturb train data.h5ad --out runs/papalexi

  celltune perturb train data.h5ad --out runs/p --config examples/perturb.yaml --epochs 5

  celltune perturb train data.h5ad --out runs/p --resume          # after an interruption

  celltune perturb train data.h5ad --out runs/ft --pretrained scGPT_human/ --device cuda

  celltune perturb train data.h5ad --out runs/lora --pretrained scGPT_human/ --finetune lora

  celltune perturb train big.h5ad --out runs/big --stream         # file larger than memory

  celltune perturb train data.h5ad --out runs/ddp --devices 2     # DDP via torchrun

--stream reads the prepared file from disk: obs (conditions, splits) and uns (DE genes)
are loaded, expression rows are read per mini-batch (the batch's cells and their control
partners), so memory does not grow with the number of cells; same model as without it.

--devices N trains on N processes (torchrun; one GPU each, or CPU cores shared): each
takes --batch-size cells of every mini-batch, so the global batch is N x --batch-size.

Any config key can be set with --set section.key=value (repeatable), e.g.
--set model.decoder=affine --set data.max_cells_per_condition=500.
Precedence: defaults < --config YAML < --set < the named options.
"""


def _setup_logging() -> None:
    """INFO logs to stderr unless the application configured logging already."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    logging.getLogger("celltune").setLevel(logging.INFO)


@perturb_app.command("train", epilog=TRAIN_EXAMPLES)
def train_cmd(
    data: Path = typer.Argument(..., help="Prepared .h5ad from 'celltune perturb prepare'."),
    out: Path = typer.Option(..., "--out", "-o", help="Output run directory."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML config (see examples/perturb.yaml)."
    ),
    pretrained: Path | None = typer.Option(
        None, "--pretrained", help="scGPT model dir: loads encoder/value_encoder/transformer."
    ),
    finetune: str | None = ft.FINETUNE,
    lora_rank: int | None = ft.LORA_RANK,
    lora_alpha: float | None = ft.LORA_ALPHA,
    lora_targets: str | None = ft.LORA_TARGETS,
    freeze_layers: int | None = ft.FREEZE_LAYERS,
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default 15)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Mini-batch (default 64)."),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", help="Genes per sequence (default 1536; perturbed genes kept)."
    ),
    include_zero_gene: str | None = typer.Option(
        None, "--include-zero-gene", help="all (default) | nonzero: genes in each sequence."
    ),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of every random choice (default 0)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from OUT/checkpoint.pt after an interruption."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Logs only, no progress bars."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Any config key: section.key=value (repeatable)."
    ),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Read expression rows from the file per mini-batch instead of loading it "
        "(data.stream; the file needs its GEARS DE genes, as 'prepare' writes them).",
    ),
    devices: int | None = typer.Option(
        None,
        "--devices",
        help="Train on N processes (DDP via torchrun; --batch-size cells per process).",
    ),
) -> None:
    """Train the perturbation-flag transformer (control cell in, perturbed cell out).

    Selects the model on validation pearson_delta, early stopping with patience; writes
    OUT/model/ (scGPT format), history.csv, config.yaml, controls.h5ad and run.json.
    """
    from celltune.cli.launch import relaunch_under_torchrun
    from celltune.tasks.config import apply_overrides
    from celltune.tasks.perturbation import load_perturb_config, train_perturbation_model
    from celltune.train import distributed as dist_utils

    _setup_logging()
    code = relaunch_under_torchrun(devices, device)
    if code is not None:
        raise typer.Exit(code)
    cfg = load_perturb_config(config)
    cfg = apply_overrides(cfg, list(set_ or []))
    cfg = apply_overrides(
        cfg,
        {
            "model.pretrained": None if pretrained is None else str(pretrained),
            "train.epochs": epochs,
            "train.batch_size": batch_size,
            "train.device": device,
            "train.seed": seed,
            "train.quiet": True if quiet else None,
            "data.max_seq_len": max_seq_len,
            "data.include_zero_gene": include_zero_gene,
            "data.stream": True if stream else None,
            **ft.finetune_overrides(finetune, lora_rank, lora_alpha, lora_targets, freeze_layers),
        },
    )
    cfg.validate()
    run = train_perturbation_model(data, out, cfg, resume=resume)
    if dist_utils.is_main_process():
        _report_train(run.info, out)


def _report_train(info: dict[str, Any], out: Path) -> None:
    """The few lines ``perturb train`` prints when it is done (rank 0)."""
    typer.echo(
        f"trained {info['epochs_run']} epoch(s) in {info['fit_seconds']:.0f} s; best "
        f"val pearson_delta {info['best_val_pearson_delta']:.4f} at epoch {info['best_epoch']}"
    )
    if info["n_unplaceable"]:
        typer.echo(
            f"{info['n_unplaceable']} perturbation(s) target genes outside the gene list and "
            "were left out of training (see run.json)"
        )
    typer.echo(f"wrote {out}/ (model/, history.csv, config.yaml, run.json)")


@perturb_app.command("predict")
def predict_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory from 'celltune perturb train'."),
    more: list[str] | None = typer.Argument(
        None,
        help="Further perturbations (so that --perturbations A B+C works).",
        show_default=False,
    ),
    perturbations: list[str] = typer.Option(
        ..., "--perturbations", "-p", help="Genes or pairs: --perturbations FEV FEV+SAMD11."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output CSV (long format)."),
    n_ctrl: int = typer.Option(300, "--n-ctrl", help="Control cells averaged over."),
    seed: int = typer.Option(0, "--seed", help="Seed of the control-cell draw."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (default auto)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Mean predicted expression (and per-cell spread) of single / combination perturbations.

    Writes one row per perturbation and gene: mean, std over the control cells,
    control_mean and delta = mean − control_mean. Unknown genes are rejected by name.
    Example: celltune perturb predict runs/p --perturbations STAT1 "STAT1+JAK2" --out pred.csv
    """
    from celltune.tasks.perturbation import predict_perturbations, write_prediction_csv
    from celltune.tasks.perturbation.predict import check_prediction_out

    _setup_logging()
    check_prediction_out(out, run_dir)
    # click binds one value per --perturbations flag; the values that follow it arrive as
    # extra positional arguments, and "A B" in one quoted value is split too
    wanted = [p for item in [*perturbations, *(more or [])] for p in item.split()]
    pred = predict_perturbations(
        run_dir, wanted, n_ctrl=n_ctrl, seed=seed, device=_device(device), quiet=quiet
    )
    write_prediction_csv(pred, out)
    top = pred.to_long().assign(abs_delta=lambda d: d["delta"].abs())
    for cond, grp in top.groupby("perturbation", sort=False):
        best = grp.nlargest(5, "abs_delta")
        changes = ", ".join(
            f"{g} {d:+.3f}" for g, d in zip(best["gene"], best["delta"], strict=True)
        )
        typer.echo(f"{cond}: largest predicted changes {changes}")
    typer.echo(f"wrote {out} ({len(wanted)} perturbation(s), {pred.n_ctrl} control cells)")


@perturb_app.command("evaluate")
def evaluate_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory from 'celltune perturb train'."),
    data: Path | None = typer.Option(
        None, "--data", help="Prepared .h5ad (default: the one the run was trained on)."
    ),
    n_ctrl: int | None = typer.Option(
        None, "--n-ctrl", help="Control cells averaged per prediction (default: config)."
    ),
    n_plots: int = typer.Option(4, "--n-plots", help="Perturbations with a DE boxplot."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (default auto)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an evaluation of another --data in DIR."
    ),
) -> None:
    """Score the test perturbations with GEARS/scGPT metrics next to the baselines.

    Baselines: control mean (no change), Train Mean, additive, linear (ridge on PCA
    gene embeddings). Writes DIR/metrics.json, metrics_summary.csv,
    metrics_per_perturbation.csv, perturbation_*.png and report.html; an evaluation of
    another --data already in DIR is kept unless --overwrite.
    """
    from celltune.errors import InputError
    from celltune.report.perturbation_run import evaluate_perturbation_run

    if n_ctrl is not None and n_ctrl < 1:  # as predict: 0 must not mean "the default"
        raise InputError(f"--n-ctrl must be >= 1, got {n_ctrl}")
    _setup_logging()
    metrics = evaluate_perturbation_run(
        run_dir,
        data=data,
        n_ctrl=n_ctrl,
        n_plots=n_plots,
        device=_device(device),
        quiet=quiet,
        overwrite=overwrite,
    )
    for scope, methods in metrics["scopes"].items():
        n_perts = next(iter(methods.values()))["all"]["n_perturbations"]
        typer.echo(f"scope {scope}: mean over {n_perts} test perturbations")
        for name, s in methods.items():
            a = s["all"]
            typer.echo(
                f"  {name:<13} pearson_delta {a['pearson_delta']:.4f}  "
                f"pearson_de_delta {a['pearson_de_delta']:.4f}  mse {a['mse']:.5f}"
            )
    typer.echo(f"wrote {run_dir}/metrics.json and report.html")


BENCHMARK_EXAMPLES = """
Examples:

  celltune perturb benchmark raw.h5ad --out bench/papalexi --seeds 5

  celltune perturb benchmark gears.h5ad --out bench/adamson --not-raw --seeds 3 --epochs 2

Train options as in 'perturb train' (--config, --set section.key=value, --epochs, ...).
"""


@perturb_app.command("benchmark", epilog=BENCHMARK_EXAMPLES)
def benchmark_cmd(
    data: Path = typer.Argument(..., help="Perturb-seq .h5ad, as for 'perturb prepare'."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    seeds: int = typer.Option(5, "--seeds", help="Split seeds K (seeds 1..K)."),
    split: str = typer.Option("simulation", help="GEARS split type, as for 'prepare'."),
    not_raw: bool = typer.Option(
        False, "--not-raw", help="X is already normalised + log1p: skip normalisation."
    ),
    n_hvg: int = typer.Option(5000, help="Highly variable genes kept (all when fewer)."),
    n_ctrl: int | None = typer.Option(
        None, "--n-ctrl", help="Control cells averaged per prediction (default: config)."
    ),
    config: Path | None = typer.Option(None, "--config", help="YAML train config."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default 15)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Mini-batch."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda."),
    seed: int | None = typer.Option(
        None, "--seed", help="Model seed, fixed over splits (default 0)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Logs only, no progress bars."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Any config key: section.key=value (repeatable)."
    ),
) -> None:
    """Train and score the model and every baseline on K split seeds, with uncertainty.

    Writes OUT/metrics.json (per seed; mean ± sd per metric and method; paired comparison
    against the best baseline of each seed: wins out of K, mean difference, bootstrap 95%
    interval), benchmark_summary.csv, benchmark_paired.csv, benchmark_metrics.png,
    report.html, and each seed's data and run under OUT/seed_S/.
    """
    from celltune.errors import CelltuneError
    from celltune.report.perturbation_benchmark import HEADLINE, run_benchmark
    from celltune.tasks.config import apply_overrides
    from celltune.tasks.perturbation import load_perturb_config

    _setup_logging()
    try:
        cfg = load_perturb_config(config)
        cfg = apply_overrides(cfg, list(set_ or []))
        cfg = apply_overrides(
            cfg,
            {
                "train.epochs": epochs,
                "train.batch_size": batch_size,
                "train.device": device,
                "train.seed": seed,
                "train.quiet": True if quiet else None,
            },
        )
        cfg.validate()
        res = run_benchmark(
            data, out, cfg, seeds=seeds, split=split, data_is_raw=not not_raw, n_hvg=n_hvg,
            n_ctrl=n_ctrl, quiet=quiet,
        )  # fmt: skip
    except CelltuneError as err:
        typer.secho(f"Error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    typer.echo(f"{len(res['seeds'])} split seeds in {res['seconds']:.0f} s; mean ± sd:")
    for name, s in res["summary"].items():
        cells = "  ".join(f"{m} {s[m]['mean']:.3f}±{s[m]['sd']:.3f}" for m in HEADLINE[:3])
        typer.echo(f"  {name:<13} {cells}")
    for row in res["paired_vs_best_baseline"]:
        if row["metric"] in HEADLINE:
            typer.echo(
                f"  vs best baseline, {row['metric']}: wins {row['wins']}/{row['k']}, "
                f"diff {row['mean_diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
            )
    typer.echo(f"wrote {out}/metrics.json and report.html")


def register(app: typer.Typer) -> None:
    """Attach the ``perturb`` sub-app to the root app."""
    app.add_typer(perturb_app, name="perturb")


def _device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is there, else ``cpu`` (the same rule as integrate)."""
    from celltune.tasks.integration import resolve_embed_device

    return str(resolve_embed_device(device))
