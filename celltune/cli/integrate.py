"""CLI commands ``celltune integrate`` (fine-tune + evaluate + report) and ``celltune embed``.

``run_integrate`` is the Python equivalent of the ``integrate`` command: training and
embedding come from :func:`celltune.tasks.integration.integrate`; the scIB metrics,
baselines, UMAPs and the HTML report are added here because the evaluation and report
layers sit to the right of ``tasks`` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from anndata import AnnData

    from celltune.tasks.integration import IntegrationConfig, IntegrationResult

logger = logging.getLogger(__name__)

INTEGRATE_EXAMPLES = """
Examples:

  celltune integrate kang.h5ad --batch-key batch --label-key cell_type --out runs/kang

  celltune integrate kang.h5ad --batch-key batch --label-key cell_type --out runs/kang \\
      --config examples/integrate.yaml --epochs 10 --max-seq-len 601 --baselines pca,harmony

  celltune integrate kang.h5ad --batch-key batch --out runs/kang --resume   # after a stop

  celltune integrate kang.h5ad --batch-key batch --out runs/ft --pretrained scGPT_human/

Any config key can be set with --set section.key=value (repeatable), e.g.
--set model.d_model=64 --set data.n_hvg=600 --set tokens.include_zero_gene=false.
Precedence: defaults < --config YAML < --set < the named options.
"""

EMBED_EXAMPLES = """
Examples:

  celltune embed kang.h5ad --model runs/kang/model --out kang_emb.h5ad --batch-key batch

  celltune embed pbmc.h5ad --model scGPT_human/ --out pbmc_emb.h5ad --batch-size 32
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


def _subsample_for_eval(ad: AnnData, n: int | None, batch_key: str, seed: int) -> AnnData:
    """A seeded, batch-stratified subsample bounding the cost of baselines and metrics."""
    import numpy as np

    if n is None or ad.n_obs <= n:
        return ad
    b = ad.obs[batch_key].astype(str).to_numpy()
    rng = np.random.default_rng([int(seed), 0xE7A1])
    keep = []
    for cat in sorted(np.unique(b)):
        idx = np.flatnonzero(b == cat)
        keep.append(rng.permutation(idx)[: max(1, round(n * idx.size / b.size))])
    sel = np.sort(np.concatenate(keep))
    logger.info("evaluating on %d of %d cells (--eval-cells)", sel.size, ad.n_obs)
    return ad[sel].copy()


def _compute_baselines(
    ev: AnnData, cfg: IntegrationConfig, notes: dict[str, str]
) -> dict[str, str]:
    """Baseline embeddings into ``ev.obsm``; returns {method: obsm key} of those computed."""
    from celltune.eval import baselines as bl

    batch_key = cfg.data.batch_key
    assert batch_key is not None
    seed = cfg.train.seed
    keys: dict[str, str] = {}
    wanted = cfg.eval.baselines
    n_batches = ev.obs[batch_key].nunique()
    if "pca" in wanted or "harmony" in wanted:
        t0 = time.perf_counter()
        bl.pca_embedding(ev, layer="X_normed", seed=seed, key="X_pca")
        logger.info("baseline pca: %.1f s", time.perf_counter() - t0)
        if "pca" in wanted:
            keys["pca"] = "X_pca"
    if "harmony" in wanted:
        if n_batches < 2:
            notes["harmony"] = "skipped: a single batch"
        else:
            t0 = time.perf_counter()
            try:
                bl.harmony_embedding(ev, batch_key, basis="X_pca", seed=seed, key="X_harmony")
                keys["harmony"] = "X_harmony"
                logger.info("baseline harmony: %.1f s", time.perf_counter() - t0)
            except Exception as err:  # a baseline must not sink the run
                notes["harmony"] = f"failed: {type(err).__name__}: {err}"
                logger.warning("harmony baseline failed: %s", err)
    if "scvi" in wanted:
        if n_batches < 2:
            notes["scvi"] = "skipped: a single batch"
        elif "counts" not in ev.layers:
            notes["scvi"] = "skipped: scVI needs raw counts (data_is_raw=False)"
        else:
            t0 = time.perf_counter()
            try:
                emb, reason = bl.scvi_embedding(
                    ev,
                    batch_key,
                    counts_layer="counts",
                    max_epochs=cfg.eval.scvi_max_epochs,
                    seed=seed,
                    key="X_scvi",
                )
            except Exception as err:  # reported as a note, run goes on
                emb, reason = None, f"failed: {type(err).__name__}: {err}"
            if emb is None:
                notes["scvi"] = f"skipped: {reason}"
            else:
                keys["scvi"] = "X_scvi"
                logger.info("baseline scvi: %.1f s", time.perf_counter() - t0)
    return keys


def _plots(
    ev: AnnData,
    methods: dict[str, str],
    cfg: IntegrationConfig,
    out: Path,
    table: Any = None,
) -> list[Path]:
    """UMAP PNGs (one panel per method) by batch and by cell type, plus a metrics chart."""
    from celltune.report import integration_plots

    assert cfg.data.batch_key is not None
    paths = integration_plots.plot_umaps(
        ev,
        methods,
        out,
        batch_key=cfg.data.batch_key,
        label_key=cfg.data.label_key,
        seed=cfg.train.seed,
    )
    images = list(paths.values())
    if table is not None and len(table):
        images.append(integration_plots.plot_metrics(table, out / "metrics.png"))
    return images


def run_integrate(
    adata: AnnData,
    config: IntegrationConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
) -> IntegrationResult:
    """The ``integrate`` command as a function: fine-tune, embed, evaluate, report.

    Writes everything listed in ``docs/readme_parts/integration.md`` to ``out_dir`` and
    returns the :class:`IntegrationResult` with ``metrics`` (a DataFrame, one row per
    method) filled when a label column was given.
    """
    import pandas as pd

    from celltune.data import io
    from celltune.files import write_json_atomic
    from celltune.report.html import Section, write_report
    from celltune.tasks.integration import EMBEDDING_KEY, KNOWN_BASELINES, integrate

    t0 = time.perf_counter()
    out = Path(out_dir)
    result = integrate(adata, config, out, resume=resume)
    from celltune.train import distributed as dist_utils

    if not dist_utils.is_main_process():  # under torchrun only rank 0 evaluates and writes
        return result
    cfg = result.config
    batch_key, label_key = cfg.data.batch_key, cfg.data.label_key
    assert batch_key is not None
    ev = _subsample_for_eval(result.processed, cfg.eval.eval_cells, batch_key, cfg.train.seed)
    notes: dict[str, str] = {}
    methods = {"celltune": EMBEDDING_KEY}
    methods.update(_compute_baselines(ev, cfg, notes))
    for name in cfg.eval.baselines:
        if name not in methods and name not in notes:
            notes[name] = "skipped"

    # Baseline embeddings of all cells go into integrated.h5ad too (for side-by-side use).
    if ev.n_obs == result.adata.n_obs:
        for name, key in methods.items():
            if name != "celltune":
                result.adata.obsm[key] = ev.obsm[key]
        io.write_h5ad(result.adata, out / "integrated.h5ad")

    metrics: dict[str, Any] = {}
    table = None
    n_batches = ev.obs[batch_key].nunique()
    if label_key is None:
        reason = "no --label-key: scIB metrics need cell-type labels"
    elif n_batches < 2:
        reason = "a single batch: batch-correction metrics are undefined"
    else:
        reason = ""
        from celltune.eval.integration import scib_metrics_table, table_to_records

        table = scib_metrics_table(
            ev,
            methods,
            batch_key,
            label_key,
            seed=cfg.train.seed,
            clustering=cfg.eval.clustering,  # type: ignore[arg-type]
            quiet=cfg.train.quiet,
        )
        metrics.update(table_to_records(table))
    for name in ("celltune", *KNOWN_BASELINES):  # always the same four entries
        if name not in metrics:
            asked = name == "celltune" or name in cfg.eval.baselines
            why = notes.get(name) or (reason if asked else "not requested (--baselines)")
            metrics[name] = {"skipped": why}
    write_json_atomic(out / "metrics.json", metrics)
    result.metrics = table

    images: list[Path] = []
    if cfg.eval.umap:
        try:
            images = _plots(ev, methods, cfg, out, table)
        except Exception as err:  # plots must not sink a finished run
            logger.warning("UMAP plots failed: %s: %s", type(err).__name__, err)
    result.files.update({"metrics": out / "metrics.json", **{p.stem: p for p in images}})

    wall = time.perf_counter() - t0
    hist = result.history
    summary = [
        f"{result.adata.n_obs:,} cells, {ev.obs[batch_key].nunique()} batches ({batch_key}), "
        f"{result.processed.n_vars:,} genes; {len(hist)} epoch(s) trained, best epoch "
        f"{result.best_epoch} by validation MSE"
        + (" (stopped early)" if result.stopped_early else "")
        + f"; training {result.train_seconds:.0f} s, whole run {wall:.0f} s.",
        "Metrics are in [0, 1], higher is better. AvgBIO = mean(NMI, ARI, cell-type ASW); "
        "AvgBATCH = mean(batch ASW, graph connectivity) (scGPT's definitions).",
    ]
    summary += [f"{k}: {v}" for k, v in notes.items()]
    if reason:
        summary.append(f"No metrics table: {reason}.")
    sections = [Section("Run", text=summary)]
    if table is not None:
        extra = [c for c in ("seconds", "n_cells", "n_labelled") if c in table.columns]
        shown = table.drop(columns=extra).rename_axis(None)
        text = [f"Computed on {int(table['n_cells'].iloc[0]):,} cells."] if extra else []
        sections.append(Section("scIB metrics", text=text, tables=[shown]))
    if images:
        sections.append(
            Section(
                "UMAPs",
                images=images,
                captions=[p.stem.replace("_", " ") for p in images],
            )
        )
    keep = [c for c in hist.columns if c in ("epoch", "lr", "time_s") or c.endswith("mse")]
    keep += [c for c in hist.columns if c.endswith(("/loss", "/dab", "/ecs")) and c not in keep]
    sections.append(Section("Training history", tables=[pd.DataFrame(hist[keep])]))
    write_report(out / "report.html", "celltune integrate", sections, meta=str(out))
    result.files["report"] = out / "report.html"
    logger.info("wrote %s (%.0f s in all)", out / "report.html", wall)
    return result


# ----------------------------------------------------------------------------- commands
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
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default 30)."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Mini-batch (default 64)."),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", help="Tokens per cell incl. <cls> (default 1201)."
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
    n_hvg: int | None = typer.Option(None, "--n-hvg", help="Highly variable genes (1200)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default 1e-4)."),
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
    seed: int | None = typer.Option(None, "--seed", help="Seed of every random choice (0)."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Any config key: section.key=value (repeatable)."
    ),
) -> None:
    """Fine-tune a scGPT-architecture model for batch integration and evaluate it.

    Preprocesses (SPEC §1), holds out 10% of cells (per batch) for validation, fine-tunes
    with the full scGPT integration objective (MLM, zero-prob, GEPC, ECS, DAB; DSBN),
    embeds every cell, and compares against PCA / Harmony / scVI with scIB metrics.
    Writes OUT/integrated.h5ad, model/, metrics.json, history.csv, config.yaml,
    umap_*.png and report.html.
    """
    from celltune.data.io import read_h5ad
    from celltune.tasks.config import apply_overrides
    from celltune.tasks.integration import IntegrationConfig

    _setup_logging(quiet)
    cfg = IntegrationConfig.load(config)
    cfg = apply_overrides(cfg, list(set_ or []))
    flags: dict[str, Any] = {
        "data.batch_key": batch_key,
        "data.label_key": label_key,
        "data.n_hvg": n_hvg,
        "data.layer": layer,
        "data.data_is_raw": False if not_raw else None,
        "model.pretrained": None if pretrained is None else str(pretrained),
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
    }
    cfg = apply_overrides(cfg, flags)
    cfg.validate()
    adata = read_h5ad(data)
    result = run_integrate(adata, cfg, out, resume=resume)
    if result.metrics is not None:
        cols = [c for c in ("avg_bio", "avg_batch", "scib_total") if c in result.metrics]
        typer.echo(result.metrics[cols].round(4).to_string())
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Logs only, no progress bars."),
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
    adata = read_h5ad(data)
    res = embed(
        adata,
        model,
        batch_key=batch_key,
        batch_size=batch_size,
        device=device,
        key=key,
        layer=layer,
        gene_column=gene_column,
        max_seq_len=max_seq_len,
        quiet=quiet,
    )
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
