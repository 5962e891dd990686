"""The integration workflow: one function for every source (``--stream`` chooses the source).

::

    check input ─ pretrained ─ run dir ─ genes/HVGs ─ resume check ─ config.yaml ─ split
        ─ loaders ─ train (Trainer: resume, time estimate) ─ embed ─ outputs ─ files

The source-dependent steps are methods of :class:`~celltune.tasks.integration.inputs.RunInputs`
(in memory: :mod:`~celltune.tasks.integration.memory`; streamed:
:mod:`~celltune.tasks.integration.stream`); everything else is written once here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.errors import InputError
from celltune.tasks.config import dump_config
from celltune.tasks.integration.checks import stratified_split
from celltune.tasks.integration.config import IntegrationConfig, IntegrationResult
from celltune.tasks.integration.inputs import Genes, RunInputs
from celltune.tasks.integration.rundir import _write_model_dir, open_run_dir
from celltune.tasks.integration.train import (
    collators,
    load_pretrained,
    resolve_config,
    task_record,
    train_integration_model,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from celltune.data.source import CellSource

logger = logging.getLogger("celltune.tasks.integration")


def open_inputs(
    data: AnnData | CellSource | str | os.PathLike[str], cfg: IntegrationConfig
) -> RunInputs:
    """The run's inputs for ``data``: an AnnData (or ``AnnDataSource``) in memory; a path
    (``.h5ad`` or ``.zarr``) is streamed with ``data.stream`` (a ``StoreSource``), else
    read into memory. A backed AnnData is streamed from its file with ``data.stream``,
    else refused (before anything is written)."""
    from celltune.data import io
    from celltune.data.source import AnnDataSource, StoreSource
    from celltune.tasks.integration.memory import InMemoryInputs
    from celltune.tasks.integration.stream import StreamedInputs

    if isinstance(data, (str, os.PathLike)):
        if cfg.data.stream:
            data = StoreSource(data, cfg.data.layer)
        elif Path(data).is_dir():  # a .zarr store (StoreSource names what else it may be)
            import anndata

            StoreSource(data).close()
            data = anndata.read_zarr(data)
        else:
            data = io.read_h5ad(data)
    if getattr(data, "isbacked", False):  # its file can be streamed, not copied in memory
        if not cfg.data.stream:
            raise InputError(
                f"a backed AnnData ({data.filename}) cannot be integrated in memory: stream "
                "its file (data.stream=True, integrate_file(path, ...), --stream) or load it "
                "first (adata.to_memory())"
            )
        data = StoreSource(data.filename, cfg.data.layer)
    if isinstance(data, StoreSource):
        return StreamedInputs(data, cfg)
    if not isinstance(data, AnnDataSource):
        data = AnnDataSource(data)  # data.layer is applied by preprocessing (SPEC §1)
    return InMemoryInputs(data, cfg)


def integrate(
    data: AnnData | CellSource | str | os.PathLike[str],
    config: IntegrationConfig | Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
) -> IntegrationResult:
    """Fine-tune a model for batch integration on ``data`` and embed every cell.

    ``data``: an AnnData (in memory), or the path of an ``.h5ad``/``.zarr`` (streamed from
    disk when ``config.data.stream``, else read). ``config``: an :class:`IntegrationConfig`
    (or a nested dict of the same shape). ``out_dir``: where ``config.yaml``,
    ``history.csv``, checkpoints, ``model/`` and ``integrated.h5ad`` go (``None``: a
    temporary directory, nothing kept). ``resume``: continue from
    ``out_dir/checkpoint.pt`` (same settings and input required).
    """
    from celltune.train import CHECKPOINT_NAME, check_resume_input
    from celltune.train import distributed as dist_utils

    t_start = time.perf_counter()
    dist_utils.init_distributed()  # under torchrun: samplers below must see the group
    cfg = resolve_config(config)
    inputs = open_inputs(data, cfg)
    batch_cats = inputs.check()  # before anything is written
    pretrained = load_pretrained(cfg)  # sets cfg.model to its architecture; refuses a bad one
    out, tmp_dir = open_run_dir(cfg, out_dir, resume)  # --resume: the settings checked
    genes = inputs.choose_genes(pretrained, batch_cats)
    fingerprint = inputs.fingerprint(genes.vocab)
    if resume:  # the input and vocabulary checked too, before anything is written
        check_resume_input(out / CHECKPOINT_NAME, fingerprint)
    if out_dir is not None and dist_utils.is_main_process():
        dump_config(cfg, out / "config.yaml", header="celltune integrate: resolved configuration")

    split_idx = stratified_split(inputs.batch_names(), cfg.data.valid_fraction, cfg.train.seed)
    _log_split(inputs.n_cells(), split_idx, batch_cats, genes)
    colls = collators(cfg, genes.vocab, genes.gene_ids)
    train_loader, val_loader = inputs.loaders(genes, batch_cats, split_idx, colls)
    trainer, history, model, train_seconds = train_integration_model(
        cfg,
        genes.vocab,
        len(batch_cats),
        pretrained,
        train_loader,
        val_loader,
        out,
        resume,
        fingerprint=fingerprint,
    )
    task_info = task_record(cfg, batch_cats, genes.pp_cfg, genes.names)
    if inputs.streamed:
        task_info["stream"] = True
    result = IntegrationResult(
        adata=None,  # type: ignore[arg-type]  # filled below
        processed=None,  # type: ignore[arg-type]
        model=model,
        vocab=genes.vocab,
        config=cfg,
        history=pd.DataFrame(history.records),
        best_epoch=history.best_epoch,
        stopped_early=history.stopped_early,
        out_dir=None if out_dir is None else out,
        train_seconds=train_seconds,
        n_genes_matched=genes.n_matched,
    )
    main = dist_utils.is_main_process()
    if inputs.embed_on_every_rank or main:
        run = _history_record(history, train_seconds)
        write = out_dir is not None and main
        _embed_and_write(inputs, result, genes, split_idx, trainer, (task_info, run), out, write)
    else:  # a streamed run: rank 0 alone embeds and writes
        result.adata, result.processed = inputs.placeholder(), inputs.placeholder()
    if tmp_dir is not None:
        tmp_dir.cleanup()
    how = " (streamed)" if inputs.streamed else ""
    logger.info("integration%s finished in %.1f s", how, time.perf_counter() - t_start)
    return result


def integrate_file(
    path: str | Path,
    config: IntegrationConfig | Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
) -> IntegrationResult:
    """:func:`integrate` streamed from a file on disk (``.h5ad``/``.zarr``), whatever
    ``config.data.stream`` says: memory is set by ``data.chunk_size x data.buffer_chunks``
    rows, the HVG sample and the model, not by the number of cells."""
    cfg = resolve_config(config)
    cfg.data.stream = True
    return integrate(Path(path), cfg, out_dir, resume=resume)


def _embed_and_write(
    inputs: RunInputs,
    result: IntegrationResult,
    genes: Genes,
    split_idx: tuple[np.ndarray, np.ndarray],
    trainer: Any,
    records: tuple[dict[str, Any], dict[str, Any]],
    out: Path,
    write: bool,
) -> None:
    """Embed every cell, fill ``result`` (adata, processed, ``uns['celltune']`` from the
    task record and the training record) and, with ``write``, write ``model/`` and
    ``integrated.h5ad``."""
    split = np.full(inputs.n_cells(), "train", dtype=object)
    split[split_idx[1]] = "valid"
    emb = inputs.embed(result.model, trainer.device, out)
    outs = inputs.outputs(emb, genes, split)
    result.adata, result.processed = outs.adata, outs.processed
    task_info, run = records
    result.adata.uns["celltune"] = {"integration": {**task_info, **outs.extra_record, **run}}
    if write:
        result.files = _write_outputs(result, task_info, trainer, out)
    del emb
    inputs.cleanup(out)


def _log_split(
    n: int, split_idx: tuple[np.ndarray, np.ndarray], batch_cats: list[str], genes: Genes
) -> None:
    logger.info(
        "%s cells: %s train / %s validation, %d batches, %d genes",
        f"{n:,}",
        f"{split_idx[0].size:,}",
        f"{split_idx[1].size:,}",
        len(batch_cats),
        len(genes.names),
    )


def _history_record(history: Any, train_seconds: float) -> dict[str, Any]:
    return {
        "best_epoch": history.best_epoch,
        "best_val_mse": history.best_metric,
        "epochs_run": len(history),
        "train_seconds": round(train_seconds, 2),
        "cell_keys_of": "obs_names",
    }


def _write_outputs(
    result: IntegrationResult, task_info: Mapping[str, Any], trainer: Any, out: Path
) -> dict[str, Path]:
    """``model/`` (with ``celltune_task.json``) and ``integrated.h5ad``; the files dict."""
    from celltune.data import io

    files: dict[str, Path] = {"model": out / "model", "integrated": out / "integrated.h5ad"}
    _write_model_dir(result.model, result.vocab, files["model"], task_info)
    io.write_h5ad(result.adata, files["integrated"])
    files["history"] = trainer.history_path
    files["config"] = out / "config.yaml"
    files["checkpoint"] = trainer.checkpoint_path
    return files


__all__ = ["integrate", "integrate_file", "open_inputs"]
