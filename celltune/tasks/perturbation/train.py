"""``train_perturbation_model``: fine-tune the perturbation-flag transformer (SPEC §6).

The steps, one function each: open the run (join the torchrun group, refuse to overwrite a
run),
resolve genes against the model's vocabulary, check which perturbations the model can
learn, choose validation cells, build the paired loader, fit with the shared
:class:`~celltune.train.loop.Trainer`, then write the control pool and ``run.json``
(the run directory is described in :mod:`celltune.tasks.perturbation.rundir`).

Under torchrun (``--devices N``) every rank takes its share of each global mini-batch
(``train.batch_size`` cells per rank), DDP averages the gradients, and rank 0 alone
writes the run directory; each cell's control partner and gene subset come from its own
seeded stream, so the ranks together see what one process would with ``N`` times the
batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from celltune.errors import InputError
from celltune.files import write_json_atomic
from celltune.tasks.perturbation.config import CTRL, SELECT_METRIC, PerturbConfig
from celltune.tasks.perturbation.data import (
    PerturbationData,
    check_prepared,
    de_cols,
    dense_rows,
    pick_rows,
    read_prepared,
    resolve_data,
)
from celltune.tasks.perturbation.model import build_model, forward
from celltune.tasks.perturbation.pairing import (
    EpochShuffle,
    PerturbationCollator,
    PerturbationPairs,
)
from celltune.tasks.perturbation.rundir import write_controls
from celltune.tasks.perturbation.stream import rows_mean
from celltune.tasks.perturbation.validation import choose_validation, validation_metrics

if TYPE_CHECKING:
    from anndata import AnnData

    from celltune.data.source import StoreSource

logger = logging.getLogger(__name__)


@dataclass
class PerturbationRun:
    """What :func:`train_perturbation_model` returns."""

    out_dir: Path
    model: torch.nn.Module
    history: Any
    info: dict[str, Any]


@dataclass
class _Genes:
    """The data resolved against the model: genes kept, token genes, their vocab ids."""

    model: torch.nn.Module
    vocab: Any
    info: dict[str, Any]
    genes: list[str]
    extra: list[str]
    gene_ids: np.ndarray
    n_dropped: int
    pdata: PerturbationData


@dataclass
class _Validation:
    """Validation cells and the inputs ``eval_fn`` scores them with."""

    cells: dict[str, np.ndarray]
    description: str
    controls: np.ndarray
    ctrl_mean: np.ndarray
    truth: dict[str, np.ndarray]
    de: dict[str, np.ndarray]


def train_perturbation_model(
    data: AnnData | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: PerturbConfig | None = None,
    *,
    resume: bool = False,
    quiet: bool | None = None,
) -> PerturbationRun:
    """Fine-tune the perturbation-flag transformer on a prepared file (see the package doc).

    The run directory is locked while training (a second run into it is refused) and gets
    ``manifest.json`` last (docs/reliability.md)."""
    from celltune.files import RunLock, clean_orphan_temps, input_record, write_manifest
    from celltune.train import distributed as dist_utils

    cfg, out = _open_run(out_dir, config, resume=resume, quiet=quiet)
    main = dist_utils.is_main_process()  # rank 0 owns and alone writes the run directory
    with RunLock(out) if main else contextlib.nullcontext():
        if main:
            clean_orphan_temps(out)
        run = _train(data, cfg, out, resume)
        if main:
            inputs = input_record(data=data) if isinstance(data, (str, os.PathLike)) else {}
            write_manifest(out, "perturb train", inputs, [])
    return run


def _train(
    data: AnnData | str | os.PathLike[str], cfg: PerturbConfig, out: Path, resume: bool
) -> PerturbationRun:
    """The training run of :func:`train_perturbation_model`, under its lock."""
    t_start = time.perf_counter()
    adata, store, source = _read_data(data, cfg)
    torch.manual_seed(cfg.train.seed)
    g = _resolve_genes(adata, cfg, source, store)
    pdata = g.pdata
    all_perts, unplaceable = _check_perturbations(pdata)
    control_train = np.flatnonzero((pdata.conditions == CTRL) & (pdata.split == "train"))
    val_cells, validation = choose_validation(pdata, cfg.train.seed)
    held_out = np.concatenate(list(val_cells.values())) if val_cells else None
    # held-out rows matter only when they are training rows (pick_rows reads one split)
    train_rows, train_cols, _ = pick_rows(
        pdata, "train", cfg.data.max_cells_per_condition, cfg.train.seed, exclude=held_out
    )
    if len(train_rows) == 0:
        raise InputError(
            "no training cells are left after holding out validation cells; add cells or "
            "perturbations to the training split"
        )
    val = _validation_inputs(adata, pdata, val_cells, validation, control_train, cfg)
    dataset, loader = _train_loader(pdata, train_rows, train_cols, control_train, g, cfg)
    logger.info(
        "training on %d cells (%d perturbations with a flaggable gene + %d control cells), "
        "%d genes; validation: %s (%d perturbations)",
        len(dataset),
        _n_train_perturbations(pdata, train_rows),
        int((pdata.conditions[train_rows] == CTRL).sum()),
        len(g.genes),
        validation,
        len(val_cells),
    )
    model, history, trainer, fit_s = _fit(g, val, loader, cfg, out, resume=resume)
    if not trainer.is_main:  # the other ranks are done: rank 0 writes what follows
        return PerturbationRun(out_dir=out, model=model, history=history, info=dict(g.info))

    # control pool for `predict` (same gene order as the model's gene list)
    pool_n = min(cfg.data.control_pool, len(control_train))
    pool_rows = np.sort(
        np.random.default_rng([cfg.train.seed, 19]).choice(control_train, pool_n, replace=False)
    )
    write_controls(adata, pdata, pool_rows, out / "controls.h5ad")

    info = g.info
    info.update(_run_info(source, g, cfg, train_rows, all_perts, unplaceable, val, history))
    info.update(
        {
            "fit_seconds_this_call": round(fit_s, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "device": str(trainer.device),
            "amp": trainer.amp,
            "torch_threads": torch.get_num_threads(),
        }
    )
    write_json_atomic(out / "run.json", info)
    logger.info(
        "trained in %.1f s; best %s %.4f at epoch %s; model in %s",
        fit_s,
        SELECT_METRIC,
        history.best_metric if history.best_metric is not None else float("nan"),
        history.best_epoch,
        out / "model",
    )
    return PerturbationRun(out_dir=out, model=model, history=history, info=info)


def _read_data(
    data: AnnData | str | os.PathLike[str], cfg: PerturbConfig
) -> tuple[AnnData, StoreSource | None, str]:
    """The prepared data, checked: in memory, or (``data.stream``) obs/var/uns in an AnnData
    without X plus the file as a ``StoreSource`` whose rows are read per mini-batch."""
    if not cfg.data.stream:
        adata, source = read_prepared(data)
        check_prepared(adata, source)
        return adata, None, source
    from celltune.tasks.perturbation.stream import check_prepared_stream, read_prepared_stream

    if not isinstance(data, (str, os.PathLike)):
        raise InputError("data.stream (--stream) reads a file: pass the prepared file's path")
    adata, store, source = read_prepared_stream(data)
    check_prepared_stream(adata, store, source)
    return adata, store, source


def _open_run(
    out_dir: str | os.PathLike[str],
    config: PerturbConfig | None,
    *,
    resume: bool,
    quiet: bool | None,
) -> tuple[PerturbConfig, Path]:
    """The validated configuration and the run directory (refusing what cannot work)."""
    from celltune.train import distributed as dist_utils

    dist_utils.init_distributed()  # under torchrun: the sampler below must see the group
    cfg = config or PerturbConfig()
    if quiet is not None:
        cfg = dataclasses.replace(cfg, train=cfg.train.replace(quiet=quiet))
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file; give a directory path for the run")
    if out.exists() and (out / "checkpoint.pt").is_file() and not resume:
        raise InputError(
            f"{out} already holds a training run (checkpoint.pt); pass --resume to continue it "
            "or choose another --out"
        )
    return cfg, out


def _resolve_genes(
    adata: AnnData, cfg: PerturbConfig, source: str, store: StoreSource | None = None
) -> _Genes:
    """Build the model and restrict the data to the genes of its vocabulary.

    Unmeasured perturbed genes become extra token-only columns when
    ``data.unmeasured_targets == "token"``.
    """
    from celltune.data.gears import gene_symbols, parse_condition

    genes_all = list(gene_symbols(adata))
    if len(set(genes_all)) != len(genes_all):
        dup = pd.Index(genes_all)[pd.Index(genes_all).duplicated()].unique().tolist()
        raise InputError(
            f"duplicate gene symbols in var['gene_name']: {dup[:5]}; make them unique "
            "(adata.var_names_make_unique on symbols) and prepare again"
        )
    measured_set = set(genes_all)
    perturbed = sorted(
        {g for c in pd.unique(adata.obs["condition"].astype(str)) for g in parse_condition(c)}
    )
    unmeasured = [g for g in perturbed if g not in measured_set]
    extra_all = unmeasured if cfg.data.unmeasured_targets == "token" else []
    model, vocab, ids_all, info = build_model(cfg, genes_all + extra_all, cfg.model.pretrained)
    ids_measured, ids_extra = ids_all[: len(genes_all)], ids_all[len(genes_all) :]
    keep = ids_measured >= 0
    if not keep.any():
        raise InputError(
            "none of the data's genes are in the pretrained vocabulary; check that "
            "var['gene_name'] holds gene symbols"
        )
    genes = [g for g, k in zip(genes_all, keep, strict=True) if k]
    extra = [g for g, i in zip(extra_all, ids_extra, strict=True) if i >= 0]
    gene_ids = np.concatenate([ids_measured[keep], ids_extra[ids_extra >= 0]])
    pdata = resolve_data(
        adata, genes, source, extra_genes=extra, store=store, chunk_rows=cfg.data.stream_chunk_rows
    )
    if extra:
        logger.info(
            "%d perturbed gene(s) are not measured; they enter the model as an extra flagged "
            "token (value 0, not scored): %s",
            len(extra),
            ", ".join(extra[:16]) + (" ..." if len(extra) > 16 else ""),
        )
    return _Genes(model, vocab, info, genes, extra, gene_ids, int((~keep).sum()), pdata)


def _check_perturbations(pdata: PerturbationData) -> tuple[list[str], list[str]]:
    """All perturbations and those the model cannot flag; refuse when none can train."""
    all_perts = pdata.perturbations()
    unplaceable = [c for c in all_perts if not pdata.placeable(c)]
    if unplaceable:
        logger.warning(
            "%d/%d perturbations have a gene outside the model's gene list and are left out of "
            "model training/evaluation (baselines still cover them): %s",
            len(unplaceable),
            len(all_perts),
            ", ".join(unplaceable[:12]) + (" ..." if len(unplaceable) > 12 else ""),
        )
    n_train_perts = sum(1 for c in pdata.perturbations("train") if pdata.placeable(c))
    if n_train_perts == 0:
        raise InputError(
            "no training perturbation has its gene in the gene list, so the model can never "
            "see a flag; check var['gene_name'] against obs['condition']"
        )
    return all_perts, unplaceable


def _validation_inputs(
    adata: AnnData,
    pdata: PerturbationData,
    val_cells: dict[str, np.ndarray],
    description: str,
    control_train: np.ndarray,
    cfg: PerturbConfig,
) -> _Validation:
    """The control cells validation averages over, and the true means to compare with."""
    rng_pool = np.random.default_rng([cfg.train.seed, 17])
    n_eval = min(cfg.data.n_eval_ctrl, len(control_train))
    eval_ctrl_rows = np.sort(rng_pool.choice(control_train, n_eval, replace=False))
    nm = pdata.n_measured
    return _Validation(
        cells=val_cells,
        description=description,
        controls=dense_rows(pdata.X, eval_ctrl_rows),
        ctrl_mean=rows_mean(pdata.X, pdata.control_rows)[:nm],
        truth={c: rows_mean(pdata.X, r)[:nm] for c, r in val_cells.items()},
        de={c: de_cols(adata, c, pdata.genes) for c in val_cells},
    )


def _train_loader(
    pdata: PerturbationData,
    train_rows: np.ndarray,
    train_cols: list[np.ndarray],
    control_train: np.ndarray,
    g: _Genes,
    cfg: PerturbConfig,
) -> tuple[PerturbationPairs, torch.utils.data.DataLoader]:
    """Paired (control input, perturbed target) cells, re-drawn every epoch."""
    dataset = PerturbationPairs(
        pdata.X,
        target_idx=train_rows,
        pert_cols=train_cols,
        control_idx=control_train,
        keys=pdata.keys,
        seed=cfg.train.seed,
    )
    collator = PerturbationCollator(
        gene_ids=g.gene_ids,
        pad_id=g.model.config.pad_id,
        pad_value=float(g.model.config.pad_value),
        pert_pad_id=g.model.config.pert_pad_id,
        include_zero_gene=cfg.data.include_zero_gene,  # type: ignore[arg-type]
        max_seq_len=cfg.data.max_seq_len,
        seed=cfg.train.seed,
        n_measured=pdata.n_measured,
    )
    from celltune.train import distributed as dist_utils

    sampler = EpochShuffle(
        len(dataset),
        cfg.train.batch_size,
        cfg.train.seed,
        [dataset, collator],
        rank=dist_utils.rank(),
        world=dist_utils.world_size(),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collator, num_workers=cfg.train.num_workers
    )
    return dataset, loader


def _fit(
    g: _Genes,
    val: _Validation,
    loader: torch.utils.data.DataLoader,
    cfg: PerturbConfig,
    out: Path,
    *,
    resume: bool,
) -> tuple[torch.nn.Module, Any, Any, float]:
    """Train with the shared loop; the best model is saved to ``DIR/model``."""
    from celltune.losses import PerturbationObjective
    from celltune.model.checkpoint import save_model
    from celltune.tasks.config import dump_config
    from celltune.train.loop import Trainer

    objective = PerturbationObjective()
    pdata = g.pdata

    def step_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: Any) -> tuple[Any, Any]:
        """SPEC §6 loss: MSE over every non-padding position of the perturbed cell (token-only
        positions of unmeasured genes excluded: their expression is unknown)."""
        out = {"mlm_output": forward(m, batch).float()}
        return objective(out, batch, mask=batch["target_mask"])

    def eval_fn(m: torch.nn.Module, ctx: Any) -> dict[str, float]:
        return validation_metrics(
            m,
            val.controls,
            g.gene_ids,
            {c: pdata.cols_of[c] for c in val.cells},  # type: ignore[misc]
            val.truth,
            val.de,
            val.ctrl_mean,
            max_seq_len=cfg.data.max_seq_len,
            batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
            seed=cfg.train.seed,
            amp_dtype=ctx.amp_dtype,
            n_measured=pdata.n_measured,
            include_zero_gene=cfg.data.include_zero_gene,
        )

    trainer = Trainer(g.model, cfg.train, step_fn=step_fn, eval_fn=eval_fn, out_dir=out)
    if trainer.is_main:
        dump_config(
            cfg, out / "config.yaml", header="celltune perturb train: resolved configuration"
        )
    t_fit = time.perf_counter()
    history = trainer.fit(loader, resume=resume)
    fit_s = time.perf_counter() - t_fit
    if not trainer.is_main:
        return trainer.module, history, trainer, fit_s
    model = trainer.best_model()
    save_model(model, out / "model", g.vocab)
    return model, history, trainer, fit_s


def _run_info(
    source: str,
    g: _Genes,
    cfg: PerturbConfig,
    train_rows: np.ndarray,
    all_perts: list[str],
    unplaceable: list[str],
    val: _Validation,
    history: Any,
) -> dict[str, Any]:
    """The data and training facts of ``run.json`` (the caller adds timings and device)."""
    from celltune.data.gears import parse_condition

    pdata = g.pdata
    return {
        "data": source,
        "n_genes": len(g.genes),
        "token_genes": g.extra,
        "train_flagged_genes": sorted(
            {c for cond in pd.unique(pdata.conditions[train_rows]) for c in parse_condition(cond)}
        ),
        "unmeasured_targets": cfg.data.unmeasured_targets,
        "n_train_perturbations_measured": sum(
            1 for c in pdata.perturbations("train") if pdata.measured(c)
        ),
        "genes_dropped_not_in_vocab": g.n_dropped,
        "n_perturbations": len(all_perts),
        "unplaceable_perturbations": unplaceable,
        "n_unplaceable": len(unplaceable),
        "n_train_cells": len(train_rows),
        "n_train_perturbations": _n_train_perturbations(pdata, train_rows),
        "validation": val.description,
        "val_perturbations": sorted(val.cells),
        "best_epoch": history.best_epoch,
        "best_val_pearson_delta": history.best_metric,
        "epochs_run": len(history),
        "stopped_early": history.stopped_early,
        # summed over epochs, so a resumed run reports its whole training time
        "fit_seconds": round(sum(float(r.get("time_s") or 0) for r in history.records), 1),
    }


def _n_train_perturbations(pdata: PerturbationData, train_rows: np.ndarray) -> int:
    return len({c for c in pd.unique(pdata.conditions[train_rows]) if c != CTRL})
