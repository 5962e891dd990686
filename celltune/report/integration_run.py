"""The whole ``celltune integrate`` workflow as a Python function: fine-tune, embed,
evaluate against baselines, plot and report.

Training and embedding come from :func:`celltune.tasks.integration.integrate`; the scIB
metrics, baselines, UMAPs and the HTML report are added here, in the report layer, because
evaluation and reporting sit to the right of ``tasks`` (docs/ARCHITECTURE.md). The CLI
command is a thin wrapper around :func:`run_integrate`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anndata import AnnData

    from celltune.tasks.integration import IntegrationConfig, IntegrationResult

logger = logging.getLogger(__name__)


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


def _train_and_embed(
    adata: AnnData | str | Path, config: IntegrationConfig, out: Path, resume: bool
) -> IntegrationResult:
    """Fine-tune and embed (:func:`celltune.tasks.integration.integrate`); a path is
    streamed with ``data.stream``, else read, and streaming an in-memory AnnData is refused."""
    from celltune.tasks.integration import integrate

    if not isinstance(adata, (str, Path)) and config.data.stream:
        from celltune.errors import InputError

        raise InputError(
            "data.stream reads the input file from disk: pass its path "
            "(run_integrate('data.h5ad', cfg, out)), or set data.stream to false"
        )
    return integrate(adata, config, out, resume=resume)


def _methods_and_notes(
    ev: AnnData, cfg: IntegrationConfig
) -> tuple[dict[str, str], dict[str, str]]:
    """{method: obsm key} for celltune and every baseline computed, and {method: note} for
    those asked for but skipped or failed."""
    from celltune.tasks.integration import EMBEDDING_KEY

    notes: dict[str, str] = {}
    methods = {"celltune": EMBEDDING_KEY}
    methods.update(_compute_baselines(ev, cfg, notes))
    for name in cfg.eval.baselines:
        if name not in methods and name not in notes:
            notes[name] = "skipped"
    return methods, notes


def _rewrite_with_baselines(
    result: IntegrationResult, ev: AnnData, methods: dict[str, str], out: Path
) -> None:
    """Baseline embeddings of all cells go into integrated.h5ad too (for side-by-side use);
    only when the evaluation ran on every cell."""
    from celltune.data import io
    from celltune.report.log_filters import quiet_logger

    added = [key for name, key in methods.items() if name != "celltune"]
    if ev.n_obs == result.adata.n_obs and added:
        for key in added:
            result.adata.obsm[key] = ev.obsm[key]
        with quiet_logger("celltune.data.io"):  # "wrote integrated.h5ad" was logged already
            io.write_h5ad(result.adata, out / "integrated.h5ad")
        logger.info("added %s to %s", ", ".join(added), out / "integrated.h5ad")


def _scib_metrics(
    ev: AnnData, methods: dict[str, str], cfg: IntegrationConfig, notes: dict[str, str]
) -> tuple[dict[str, Any], Any, str]:
    """(metrics.json records, the metrics table or None, why there is no table or "")."""
    from celltune.tasks.integration import KNOWN_BASELINES

    batch_key, label_key = cfg.data.batch_key, cfg.data.label_key
    assert batch_key is not None
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
    return metrics, table, reason


def _safe_plots(
    ev: AnnData, methods: dict[str, str], cfg: IntegrationConfig, out: Path, table: Any
) -> list[Path]:
    """:func:`_plots` when ``eval.umap``; a failure is logged, never raised."""
    if not cfg.eval.umap:
        return []
    try:
        return _plots(ev, methods, cfg, out, table)
    except Exception as err:  # plots must not sink a finished run
        logger.warning("UMAP plots failed: %s: %s", type(err).__name__, err)
        return []


def _run_summary(
    result: IntegrationResult, ev: AnnData, notes: dict[str, str], reason: str, wall: float
) -> list[str]:
    """The report's "Run" section: data, training, timing, metric definitions, notes."""
    batch_key = result.config.data.batch_key
    summary = [
        f"{result.adata.n_obs:,} cells, {ev.obs[batch_key].nunique()} batches ({batch_key}), "
        f"{result.processed.n_vars:,} genes; {len(result.history)} epoch(s) trained, best epoch "
        f"{result.best_epoch} by validation MSE"
        + (" (stopped early)" if result.stopped_early else "")
        + f"; training {result.train_seconds:.0f} s, whole run {wall:.0f} s.",
        "Metrics are in [0, 1], higher is better. AvgBIO = mean(NMI, ARI, cell-type ASW); "
        "AvgBATCH = mean(batch ASW, graph connectivity) (scGPT's definitions).",
    ]
    summary += [f"{k}: {v}" for k, v in notes.items()]
    if reason:
        summary.append(f"No metrics table: {reason}.")
    return summary


def _report_sections(summary: list[str], table: Any, images: list[Path], hist: Any) -> list[Any]:
    """report.html's sections: run, scIB metrics, UMAPs, training history (the verdict
    goes on top, :func:`celltune.report.html.write_report`'s ``verdict``)."""
    import pandas as pd

    from celltune.report.html import Section

    sections = [Section("Run", text=summary)]
    if table is not None:
        extra = [c for c in ("seconds", "n_cells", "n_labelled") if c in table.columns]
        shown = table.drop(columns=extra).rename_axis("method")
        lead = [c for c in ("scib_total", "scib_bio", "scib_batch") if c in shown.columns]
        shown = shown[lead + [c for c in shown.columns if c not in lead]]  # headline first
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
    return sections


def run_integrate(
    adata: AnnData | str | Path,
    config: IntegrationConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
) -> IntegrationResult:
    """The ``integrate`` command as a function: fine-tune, embed, evaluate, report.

    Writes everything listed in ``docs/integration.md`` to ``out_dir`` and
    returns the :class:`IntegrationResult` with ``metrics`` (a DataFrame, one row per
    method) filled when a label column was given. ``adata`` may be a path: with
    ``config.data.stream`` the file is streamed from disk
    (:func:`celltune.tasks.integration.integrate` with a path), else it is read.
    """
    from celltune.eval.integration_verdict import integration_verdict
    from celltune.files import write_json_atomic, write_manifest
    from celltune.report.html import write_report
    from celltune.train import distributed as dist_utils

    t0 = time.perf_counter()
    out = Path(out_dir)
    result = _train_and_embed(adata, config, out, resume)
    if not dist_utils.is_main_process():  # under torchrun only rank 0 evaluates and writes
        return result
    cfg = result.config
    assert cfg.data.batch_key is not None
    ev = _subsample_for_eval(
        result.processed, cfg.eval.eval_cells, cfg.data.batch_key, cfg.train.seed
    )
    methods, notes = _methods_and_notes(ev, cfg)
    _rewrite_with_baselines(result, ev, methods, out)

    from celltune.report.log_filters import once_per_run

    with once_per_run("isolated labels"):  # scib-metrics says it once per method
        metrics, table, reason = _scib_metrics(ev, methods, cfg, notes)
    write_json_atomic(out / "metrics.json", metrics)
    result.metrics = table

    images = _safe_plots(ev, methods, cfg, out, table)
    result.files.update({"metrics": out / "metrics.json", **{p.stem: p for p in images}})

    wall = time.perf_counter() - t0
    summary = _run_summary(result, ev, notes, reason, wall)
    verdict = integration_verdict(metrics)
    # a verdict that celltune loses to PCA is a warning, so a user cannot miss it
    logger.log(logging.WARNING if "NOT" in verdict else logging.INFO, "verdict: %s", verdict)
    sections = _report_sections(summary, table, images, result.history)
    write_report(
        out / "report.html", "celltune integrate", sections, meta=str(out), verdict=verdict
    )
    write_manifest(out)  # last: a manifest.json means the run directory is complete
    result.files["report"] = out / "report.html"
    logger.info("wrote %s (%.0f s in all)", out / "report.html", wall)
    return result
