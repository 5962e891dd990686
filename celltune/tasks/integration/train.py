"""Steps shared by every source: resolved config, pretrained model, preprocessing
parameters, collators, the task record, and training through :class:`celltune.train.Trainer`."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from celltune.errors import InputError
from celltune.tasks.config import config_from_dict
from celltune.tasks.integration.config import IntegrationConfig
from celltune.tasks.integration.health import HealthSample
from celltune.tasks.integration.model import _build_model, _forward, _objective

if TYPE_CHECKING:
    from torch import nn

from celltune.tasks.integration.recipe import apply_recipe

logger = logging.getLogger("celltune.tasks.integration")


def private_config(config: Any, schema: type) -> Any:
    """A private copy of ``config`` as ``schema`` (the caller's object is never changed):
    defaults for None, a deep copy of an instance, a parsed mapping otherwise."""
    if config is None:
        return schema()
    if isinstance(config, schema):
        return copy.deepcopy(config)
    return config_from_dict(schema, config)


def resolve_config(config: IntegrationConfig | Mapping[str, Any] | None) -> IntegrationConfig:
    """A validated private copy of ``config`` (the caller's object is never changed)."""
    cfg = private_config(config, IntegrationConfig)
    apply_recipe(cfg)
    cfg.validate()
    return cfg


def load_pretrained(cfg: IntegrationConfig) -> nn.Module | None:
    """The ``--pretrained`` model (None without one); ``cfg.model`` takes its architecture."""
    m, t = cfg.model, cfg.tokens
    if not m.pretrained:
        return None
    from celltune.model.checkpoint import load_model

    pretrained = load_model(m.pretrained, device="cpu", allow_partial=m.allow_partial)
    if pretrained.vocab is None:
        raise InputError(
            f"pretrained model {m.pretrained} has no vocab.json: a model directory needs "
            "args.json, vocab.json and best_model.pt"
        )
    # The resolved config reports the architecture actually used.
    pc = pretrained.config
    for name in ("d_model", "nhead", "d_hid", "nlayers", "nlayers_cls", "input_emb_style"):
        setattr(m, name, getattr(pc, name))
    m.cell_emb_style, m.pre_norm = pc.cell_emb_style, pc.pre_norm
    if pc.pad_value != t.pad_value:
        logger.info("using the pretrained model's pad_value %s", pc.pad_value)
        t.pad_value = float(pc.pad_value)
    return pretrained


def preprocess_config(cfg: IntegrationConfig, n_batches: int, n_genes: int) -> Any:
    """SPEC §1 parameters of this run (all genes kept when there are fewer than n_hvg)."""
    from celltune.data.preprocess import PreprocessConfig

    d = cfg.data
    pp_cfg = PreprocessConfig(
        layer=d.layer,
        data_is_raw=d.data_is_raw,
        filter_gene_by_counts=d.filter_gene_by_counts,
        filter_cell_by_counts=d.filter_cell_by_counts,
        normalize_total=d.normalize_total,
        log1p=d.log1p,
        n_hvg=d.n_hvg,
        hvg_flavor=d.hvg_flavor,
        batch_key=d.batch_key if n_batches > 1 else None,
        n_bins=d.n_bins,
        seed=cfg.train.seed,
    )
    if d.n_hvg and n_genes <= d.n_hvg:
        logger.info("n_hvg %d >= genes available (%d): keeping all genes", d.n_hvg, n_genes)
        pp_cfg = dataclasses.replace(pp_cfg, n_hvg=0)
    return pp_cfg


def collators(cfg: IntegrationConfig, vocab: Any, gene_ids: np.ndarray) -> tuple[Any, Any, Any]:
    """Training, validation and embedding collators (SPEC §2 tokenisation of this run)."""
    from celltune.data.dataset import TokenCollator

    t = cfg.tokens
    kwargs: dict[str, Any] = {
        "n_genes": int(gene_ids.size),
        "gene_ids": gene_ids,
        "cls_id": vocab.cls_id,
        "pad_id": vocab.pad_id,
        "include_zero_gene": t.include_zero_gene,
        "max_seq_len": t.max_seq_len,
        "pad_value": t.pad_value,
        "mask_value": t.mask_value,
        "mask_cls": t.mask_cls,
        "seed": cfg.train.seed,
    }
    dense = gepc_all_genes(cfg)
    train_coll = TokenCollator(mask_ratio=t.mask_ratio, dense_targets=dense, **kwargs)
    # The validation masks stay fixed (epoch 0) so val/mse is comparable across epochs; its
    # dense values (every gene, zeros included) also feed the embedding health checks.
    val_coll = TokenCollator(mask_ratio=t.mask_ratio, dense_targets=True, **kwargs)
    embed_coll = TokenCollator(mask_ratio=0.0, **kwargs)
    return train_coll, val_coll, embed_coll


def gepc_all_genes(cfg: IntegrationConfig) -> bool:
    """Whether GEPC predicts every gene (the collators then add the dense values)."""
    return cfg.objective.gepc_genes == "all" and cfg.objective.gepc_weight > 0


def task_record(
    cfg: IntegrationConfig, batch_cats: list[str], pp_cfg: Any, genes: list[str]
) -> dict[str, Any]:
    """What ``celltune_task.json`` keeps so that ``embed`` reproduces this run's tokens:
    ``genes`` (the run's HVGs) too, since a pretrained vocabulary holds many more."""
    d = cfg.data
    return {
        "task": "integration",
        "batch_key": d.batch_key,
        "batch_categories": batch_cats,
        "label_key": d.label_key,
        "gene_column": d.gene_column,
        "n_bins": d.n_bins,
        "seed": cfg.train.seed,
        "tokens": dataclasses.asdict(cfg.tokens),
        "preprocess": dict(dataclasses.asdict(pp_cfg).items()),
        "genes": [str(g) for g in genes],
    }


def _validation_fn(
    cfg: IntegrationConfig, objective: Any, val_loader: Iterable[Any], has_batches: bool
) -> Any:
    """The Trainer's ``eval_fn``: every objective term on the validation cells, plus the
    embedding health of a fixed sample of them (``val/pr``, ``val/mixing``, ``val/preserve``)."""

    from celltune.losses import masked_mse

    mask_value = cfg.tokens.mask_value
    health = HealthSample(max_cells=cfg.eval.health_cells)

    def eval_fn(net: nn.Module, ctx: Any) -> dict[str, float]:
        sums: dict[str, float] = {}
        n_total = 0
        for batch in val_loader:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            dense = {k: batch.pop(k) for k in ("all_values", "all_gene_ids")}
            if gepc_all_genes(cfg):
                batch.update(dense)
            with ctx.autocast():
                outputs = _forward(net, net, batch, cfg)
                mask = batch["values"].eq(mask_value) & ~batch["padding_mask"]
                loss, terms = objective(outputs, batch, mask)
                if "mse" not in terms:  # model selection uses it even when its weight is 0
                    terms["mse"] = masked_mse(outputs["mlm_output"], batch["target_values"], mask)
            health.add(outputs["cell_emb"], batch, dense["all_values"])
            n = int(batch["gene_ids"].shape[0])
            n_total += n
            sums["loss"] = sums.get("loss", 0.0) + float(loss) * n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
        scores = {f"val/{k}": v / max(n_total, 1) for k, v in sums.items()}
        scores.update(health.scores(has_batches))
        return scores

    return eval_fn


def train_integration_model(
    cfg: IntegrationConfig,
    vocab: Any,
    n_batches: int,
    pretrained: nn.Module | None,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    out: Path,
    resume: bool,
    fingerprint: Mapping[str, Any] | None = None,
) -> tuple[Any, Any, nn.Module, float]:
    """Build the model and fit it with the SPEC §4 objective; returns the trainer, its
    history, the best model and the training seconds (the same for in-memory and
    streamed data: only the loaders differ)."""
    import torch

    from celltune.train import Trainer
    from celltune.train.schedule import budget_epochs

    epochs = budget_epochs(train_loader, cfg.train)
    if epochs != cfg.train.epochs:
        logger.info(
            "training budget of %d optimizer steps: %d epoch(s) instead of %d",
            cfg.train.max_steps,
            epochs,
            cfg.train.epochs,
        )
        cfg.train = cfg.train.replace(epochs=epochs)
    torch.manual_seed(cfg.train.seed)
    from celltune.model.finetune import apply_finetune

    model = _build_model(cfg, vocab, n_batches, pretrained)
    model.vocab = vocab  # type: ignore[attr-defined]
    if cfg.model.gene_init == "pca" and pretrained is None:
        from celltune.tasks.integration.gene_init import pca_gene_init

        pca_gene_init(model, train_loader)  # a resumed run loads its checkpoint over it
    apply_finetune(model, cfg.finetune, pretrained=pretrained is not None)
    objective = _objective(cfg)
    mask_value = cfg.tokens.mask_value

    def step_fn(net: nn.Module, batch: Mapping[str, torch.Tensor], ctx: Any) -> Any:
        outputs = _forward(net, ctx.module, batch, cfg)
        mask = batch["values"].eq(mask_value) & ~batch["padding_mask"]
        return objective(outputs, batch, mask)

    eval_fn = _validation_fn(cfg, objective, val_loader, n_batches > 1)
    trainer = Trainer(
        model, cfg.train, step_fn=step_fn, eval_fn=eval_fn, out_dir=out, fingerprint=fingerprint
    )
    t_train = time.perf_counter()
    history = trainer.fit(train_loader, resume=resume)
    train_seconds = time.perf_counter() - t_train
    model = trainer.best_model()
    logger.info(
        "training done in %.1f s: best epoch %s (%s %.5g)%s",
        train_seconds,
        history.best_epoch,
        history.select_metric,
        history.best_metric if history.best_metric is not None else float("nan"),
        ", stopped early" if history.stopped_early else "",
    )
    return trainer, history, model, train_seconds


__all__ = [
    "collators",
    "load_pretrained",
    "preprocess_config",
    "resolve_config",
    "task_record",
    "train_integration_model",
]
