"""Annotation fine-tuning: scGPT's annotation tutorial (CLS objective) as a function,
through the one training loop :class:`celltune.train.Trainer`."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.errors import InputError
from celltune.files import write_json_atomic
from celltune.tasks.annotation.config import AnnotationConfig
from celltune.tasks.annotation.data import (
    balanced_batch_sampler,
    check_reference,
    gene_names,
)

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from torch import nn

logger = logging.getLogger(__name__)

#: Same sidecar name as integration, so ``celltune embed`` / ``map`` read its tokenisation.
TASK_FILE = "celltune_task.json"
LABELS_FILE = "labels.json"


@dataclass
class AnnotationResult:
    """What :func:`train_annotation` returns (``model_dir`` is None without ``out_dir``)."""

    model: nn.Module
    labels: list[str]
    genes: list[str]
    history: pd.DataFrame
    best_epoch: int | None
    best_macro_f1: float | None
    stopped_early: bool
    train_seconds: float
    model_dir: Path | None
    n_genes_matched: int | None = None
    files: dict[str, Path] = field(default_factory=dict)


def build_model(
    cfg: AnnotationConfig, vocab: Any, n_classes: int, n_batches: int, pretrained: Any
) -> nn.Module:
    """A CellTransformer with a CLS head of ``n_classes`` (trunk reused from ``pretrained``)."""
    from celltune.model.checkpoint import load_weights
    from celltune.model.config import ModelConfig
    from celltune.model.model import CellTransformer

    parts = {
        "n_cls": n_classes,
        "do_mvc": False,
        "explicit_zero_prob": False,
        "do_dab": cfg.dab_weight > 0,
        "use_batch_labels": False,
        "num_batch_labels": n_batches if cfg.dab_weight > 0 else 0,
        "domain_spec_batchnorm": False,
        "dropout": cfg.dropout,
    }
    if pretrained is not None:
        mc = dataclasses.replace(pretrained.config, **parts)
        model = CellTransformer(mc, vocab=vocab)
        report = load_weights(model, pretrained.state_dict())
        logger.info("pretrained weights: %s", report.summary())
        return model
    mc = ModelConfig(
        ntoken=vocab.ntoken,
        d_model=cfg.d_model,
        nhead=cfg.nhead,
        d_hid=cfg.d_hid,
        nlayers=cfg.nlayers,
        nlayers_cls=cfg.nlayers_cls,
        pad_id=vocab.pad_id,
        n_input_bins=cfg.n_bins,
        **parts,
    )
    return CellTransformer(mc, vocab=vocab)


def _objective(cfg: AnnotationConfig, mask_value: float) -> Any:
    """CE on the cell embedding (+ masked MSE, + DAB) → (total, terms)."""
    import torch.nn.functional as F

    from celltune.losses import masked_mse

    def run(net: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[Any, dict[str, Any]]:
        out = net(batch["gene_ids"], batch["values"], padding_mask=batch["padding_mask"], CLS=True)
        terms = {"cls": F.cross_entropy(out["cls_output"], batch["celltype_labels"])}
        total = cfg.cls_weight * terms["cls"]
        if cfg.mlm_weight > 0:
            mask = batch["values"].eq(mask_value) & ~batch["padding_mask"]
            terms["mse"] = masked_mse(out["mlm_output"], batch["target_values"], mask)
            total = total + cfg.mlm_weight * terms["mse"]
        if cfg.dab_weight > 0:
            terms["dab"] = F.cross_entropy(out["dab_output"], batch["batch_labels"])
            total = total + cfg.dab_weight * terms["dab"]
        return total, terms

    return run


def class_probabilities(
    model: nn.Module, loader: Any, device: Any, quiet: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of the CLS head and the dataset row of every cell, in loader order."""
    import torch
    from tqdm.auto import tqdm

    probs, rows = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="predicting", unit="batch", disable=quiet, leave=False):
                out = model(
                    batch["gene_ids"].to(device),
                    batch["values"].to(device),
                    padding_mask=batch["padding_mask"].to(device),
                    CLS=True,
                )
                probs.append(torch.softmax(out["cls_output"].float(), dim=1).cpu().numpy())
                rows.append(batch["cell_index"].numpy())
    finally:
        model.train(was_training)
    return np.concatenate(probs), np.concatenate(rows)


def _collators(cfg: AnnotationConfig, vocab: Any, gene_ids: np.ndarray) -> tuple[Any, Any]:
    from celltune.data.dataset import TokenCollator

    kw: dict[str, Any] = {
        "n_genes": int(gene_ids.size),
        "gene_ids": gene_ids,
        "cls_id": vocab.cls_id,
        "pad_id": vocab.pad_id,
        "include_zero_gene": cfg.include_zero_gene,
        "max_seq_len": cfg.max_seq_len,
        "seed": cfg.train.seed,
    }
    return TokenCollator(mask_ratio=cfg.mask_ratio, **kw), TokenCollator(mask_ratio=0.0, **kw)


def task_record(cfg: AnnotationConfig, labels: list[str], genes: list[str]) -> dict[str, Any]:
    """``celltune_task.json``: what predict / map need to tokenise a query the same way."""
    return {
        "task": "annotation",
        "label_key": cfg.label_key,
        "labels": labels,
        "genes": genes,
        "gene_column": cfg.gene_column,
        "n_bins": cfg.n_bins,
        "seed": cfg.train.seed,
        "tokens": {"include_zero_gene": cfg.include_zero_gene, "max_seq_len": cfg.max_seq_len},
    }


def _open_run_dir(out: Path, resume: bool) -> None:
    from celltune.train import CHECKPOINT_NAME

    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / CHECKPOINT_NAME).is_file():
        raise InputError(
            f"{out} already holds a training checkpoint ({CHECKPOINT_NAME}): pass --resume "
            "to continue that run, or choose a new --out directory"
        )


def _prepare(adata: AnnData, cfg: AnnotationConfig, pretrained: Any) -> tuple[Any, Any, int | None]:
    """SPEC §1 preprocessing of the reference (restricted to the pretrained vocabulary)."""
    from celltune.data.preprocess import PreprocessConfig, preprocess

    n_matched = None
    if pretrained is not None:
        match = pretrained.vocab.match_genes(list(gene_names(adata, cfg.gene_column)))
        n_matched = int(match.n_matched)
        adata = adata[:, np.asarray(match.matched, dtype=bool)]
    n_hvg = cfg.n_hvg if cfg.n_hvg and cfg.n_hvg < adata.n_vars else 0
    pp_cfg = PreprocessConfig(
        layer=cfg.layer,
        filter_gene_by_counts=cfg.filter_gene_by_counts,
        n_hvg=n_hvg,
        batch_key=cfg.batch_key if n_hvg else None,
        n_bins=cfg.n_bins,
        seed=cfg.train.seed,
    )
    return preprocess(adata, pp_cfg, quiet=cfg.train.quiet), pp_cfg, n_matched


def _resolve_config(config: AnnotationConfig | Mapping[str, Any] | None) -> AnnotationConfig:
    """A validated copy of ``config`` (an AnnotationConfig, a mapping, or None: defaults)."""
    cfg = copy.deepcopy(config) if isinstance(config, AnnotationConfig) else None
    cfg = cfg or AnnotationConfig.from_dict(config if isinstance(config, Mapping) else None)
    cfg.validate()
    return cfg


def _load_pretrained(cfg: AnnotationConfig) -> Any:
    """The ``cfg.pretrained`` model on CPU (None without one); it must carry a vocab."""
    from celltune.model.checkpoint import load_model

    pretrained = load_model(cfg.pretrained, device="cpu") if cfg.pretrained else None
    if pretrained is not None and pretrained.vocab is None:
        raise InputError(f"pretrained model {cfg.pretrained} has no vocab.json")
    return pretrained


def _vocab_and_labels(
    pp: AnnData, cfg: AnnotationConfig, pretrained: Any
) -> tuple[list[str], Any, np.ndarray, list[str], list[str] | None]:
    """(genes, vocab, gene ids, sorted labels, sorted batches or None) of the preprocessed
    reference; its label (and batch) columns become strings in place."""
    from celltune.data.vocab import GeneVocab

    genes = list(gene_names(pp, cfg.gene_column))
    vocab = pretrained.vocab if pretrained is not None else GeneVocab.from_genes(genes)
    gene_ids = np.asarray(vocab.match_genes(genes).ids, dtype=np.int64)
    labels = sorted(pp.obs[cfg.label_key].astype(str).unique())
    pp.obs[cfg.label_key] = pp.obs[cfg.label_key].astype(str)
    batch_cats = None
    if cfg.batch_key:
        pp.obs[cfg.batch_key] = pp.obs[cfg.batch_key].astype(str)
        batch_cats = sorted(pp.obs[cfg.batch_key].unique())
    return genes, vocab, gene_ids, labels, batch_cats


def _loaders(
    pp: AnnData,
    cfg: AnnotationConfig,
    vocab: Any,
    gene_ids: np.ndarray,
    labels: list[str],
    batch_cats: list[str] | None,
) -> tuple[Any, Any, Any]:
    """(train loader, validation loader, validation dataset) over a seeded, per-class
    ``cfg.valid_fraction`` hold-out; the train loader is class-balanced with ``balanced``."""
    from celltune.data.dataset import CellDataset
    from celltune.tasks.integration import stratified_split
    from celltune.train import make_loader

    train_idx, val_idx = stratified_split(pp.obs[cfg.label_key], cfg.valid_fraction, cfg.train.seed)
    kw: dict[str, Any] = {
        "layer": "X_binned",
        "label_key": cfg.label_key,
        "label_categories": labels,
        "batch_key": cfg.batch_key,
        "batch_categories": batch_cats,
    }
    train_ds = CellDataset(pp[train_idx].copy(), gene_ids, **kw)
    val_ds = CellDataset(pp[val_idx].copy(), gene_ids, **kw)
    train_coll, eval_coll = _collators(cfg, vocab, gene_ids)
    tc = cfg.train
    if cfg.balanced:
        sampler = balanced_batch_sampler(train_ds.celltype_labels, tc.batch_size, tc.seed)
        train_loader = make_loader(train_ds, tc, collate_fn=train_coll, batch_sampler=sampler)
    else:
        train_loader = make_loader(train_ds, tc, collate_fn=train_coll, shuffle=True)
    val_loader = make_loader(val_ds, tc, collate_fn=eval_coll, eval=True)
    logger.info(
        "%s cells (%s train / %s validation), %d cell types, %d genes",
        f"{pp.n_obs:,}",
        f"{train_idx.size:,}",
        f"{val_idx.size:,}",
        len(labels),
        int(gene_ids.size),
    )
    return train_loader, val_loader, val_ds


def _validation_fn(val_loader: Any, val_ds: Any, n_labels: int) -> Any:
    """The Trainer's ``eval_fn``: validation macro-F1 (the kept metric), accuracy and CE."""
    from sklearn.metrics import f1_score

    def eval_fn(net: nn.Module, ctx: Any) -> dict[str, float]:
        probs, rows = class_probabilities(net, val_loader, ctx.device)
        y = val_ds.celltype_labels[rows]
        pred = probs.argmax(1)
        ce = float(-np.log(np.maximum(probs[np.arange(y.size), y], 1e-12)).mean())
        return {
            "val/macro_f1": float(f1_score(y, pred, average="macro", labels=range(n_labels))),
            "val/accuracy": float((pred == y).mean()),
            "val/loss": ce,
        }

    return eval_fn


def _save_run(
    model: nn.Module,
    out: Path,
    vocab: Any,
    cfg: AnnotationConfig,
    labels: list[str],
    genes: list[str],
    history_path: Path,
) -> tuple[Path, dict[str, Path]]:
    """OUT/model/ (scGPT format + celltune_task.json + labels.json); (model dir, files)."""
    from celltune.model.checkpoint import save_model

    mdir = out / "model"
    save_model(model, mdir, vocab)
    write_json_atomic(mdir / TASK_FILE, task_record(cfg, labels, genes))
    write_json_atomic(mdir / LABELS_FILE, labels)
    return mdir, {"model": mdir, "history": history_path, "config": out / "config.yaml"}


def train_annotation(
    adata: AnnData,
    config: AnnotationConfig | Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
) -> AnnotationResult:
    """Fine-tune a cell-type classifier on the labelled reference ``adata``.

    10% of every class is held out (seeded) for validation; the best epoch by validation
    macro-F1 is kept and training stops after ``train.patience`` epochs without a gain.
    ``out_dir`` gets ``config.yaml``, ``history.csv``, ``checkpoint.pt`` (``--resume``) and
    ``model/`` (scGPT format + ``labels.json`` + ``celltune_task.json``).
    """
    import tempfile

    import torch

    from celltune.model.finetune import apply_finetune
    from celltune.tasks.config import dump_config
    from celltune.train import Trainer

    cfg = _resolve_config(config)
    ref = check_reference(adata, cfg)
    tmp = tempfile.TemporaryDirectory(prefix="celltune-annotate-") if out_dir is None else None
    out = Path(tmp.name if tmp else out_dir)  # type: ignore[arg-type]
    _open_run_dir(out, resume)
    if out_dir is not None:
        dump_config(cfg, out / "config.yaml", header="celltune annotate train: resolved config")

    pretrained = _load_pretrained(cfg)
    pp, _, n_matched = _prepare(ref, cfg, pretrained)
    genes, vocab, gene_ids, labels, batch_cats = _vocab_and_labels(pp, cfg, pretrained)
    train_loader, val_loader, val_ds = _loaders(pp, cfg, vocab, gene_ids, labels, batch_cats)

    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_model(cfg, vocab, len(labels), len(batch_cats or []), pretrained)
    apply_finetune(model, cfg.finetune, pretrained=pretrained is not None)
    objective = _objective(cfg, -1.0)

    def step_fn(net: nn.Module, batch: Mapping[str, torch.Tensor], ctx: Any) -> Any:
        return objective(net, batch)

    eval_fn = _validation_fn(val_loader, val_ds, len(labels))
    trainer = Trainer(model, tc, step_fn=step_fn, eval_fn=eval_fn, out_dir=out)
    t0 = time.perf_counter()
    history = trainer.fit(train_loader, resume=resume)
    seconds = time.perf_counter() - t0
    model = trainer.best_model()
    files: dict[str, Path] = {}
    mdir = None
    if out_dir is not None:
        mdir, files = _save_run(model, out, vocab, cfg, labels, genes, trainer.history_path)
    if tmp is not None:
        tmp.cleanup()
    logger.info(
        "training done in %.1f s: best epoch %s (val macro-F1 %.4f)",
        seconds,
        history.best_epoch,
        history.best_metric if history.best_metric is not None else float("nan"),
    )
    return AnnotationResult(
        model=model,
        labels=labels,
        genes=genes,
        history=pd.DataFrame(history.records),
        best_epoch=history.best_epoch,
        best_macro_f1=history.best_metric,
        stopped_early=history.stopped_early,
        train_seconds=seconds,
        model_dir=mdir,
        n_genes_matched=n_matched,
        files=files,
    )
