"""The integration model (a CellTransformer with DAB/DSBN), its objective and forward."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celltune.tasks.integration.config import IntegrationConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger("celltune.tasks.integration")


def _build_model(
    cfg: IntegrationConfig, vocab: Any, n_batches: int, pretrained: nn.Module | None
) -> nn.Module:
    """A CellTransformer for integration; with ``pretrained`` its trunk is reused."""
    from celltune.model.checkpoint import load_weights
    from celltune.model.config import ModelConfig
    from celltune.model.model import CellTransformer

    m, o, t = cfg.model, cfg.objective, cfg.tokens
    batch_parts = {
        "do_mvc": o.gepc_weight > 0,
        "explicit_zero_prob": m.explicit_zero_prob,
        "do_dab": m.dab and o.dab_weight > 0,
        "use_batch_labels": m.use_batch_labels,
        "num_batch_labels": n_batches if (m.use_batch_labels or m.dab or m.dsbn) else 0,
        "domain_spec_batchnorm": bool(m.dsbn),
        "dsbn_mode": m.dsbn_mode,
        "ecs_threshold": o.ecs_threshold,
        "dropout": m.dropout,
        "attn_dropout": m.attn_dropout,
        "pad_value": t.pad_value,
    }
    if pretrained is not None:
        base = pretrained.config  # type: ignore[attr-defined]
        mc = dataclasses.replace(base, **batch_parts)
        model = CellTransformer(mc, vocab=pretrained.vocab)  # type: ignore[attr-defined]
        report = load_weights(model, pretrained.state_dict())
        logger.info("pretrained weights: %s", report.summary())
        return model
    mc = ModelConfig(
        ntoken=vocab.ntoken,
        d_model=m.d_model,
        nhead=m.nhead,
        d_hid=m.d_hid,
        nlayers=m.nlayers,
        nlayers_cls=m.nlayers_cls,
        n_cls=1,
        pad_id=vocab.pad_id,
        pad_token=getattr(vocab, "pad_token", "<pad>"),
        input_emb_style=m.input_emb_style,
        n_input_bins=cfg.data.n_bins,
        cell_emb_style=m.cell_emb_style,
        mvc_decoder_style=m.mvc_decoder_style,
        pre_norm=m.pre_norm,
        **batch_parts,
    )
    return CellTransformer(mc, vocab=vocab)


def _objective(cfg: IntegrationConfig) -> Any:
    from celltune.losses import IntegrationObjective, ObjectiveWeights

    o, m = cfg.objective, cfg.model
    weights = ObjectiveWeights(
        mlm=o.mse_weight,
        zero_prob=o.zero_prob_weight if m.explicit_zero_prob else 0.0,
        gepc=o.gepc_weight,
        gepc_zero_prob=o.gepc_zero_prob_weight if m.explicit_zero_prob else 0.0,
        ecs_weight=o.ecs_weight,
        ecs_threshold=o.ecs_threshold,
        dab_weight=o.dab_weight if m.dab else 0.0,
        spread_weight=o.spread_weight,
        cls_weight=0.0,
        cce_weight=0.0,
    )
    objective = IntegrationObjective(weights)

    def run(outputs: Any, batch: Any, mask: Any) -> tuple[Any, dict[str, Any]]:
        # History columns without scGPT's "loss_" prefix: train/mse, val/mse, val/dab, ...
        total, terms = objective(outputs, batch, mask)
        return total, {k.removeprefix("loss_"): v for k, v in terms.items()}

    return run


def _batch_labels_for(module: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
    mc = module.config  # type: ignore[attr-defined]
    needs = mc.use_batch_labels or mc.use_dsbn or mc.do_dab
    return batch["batch_labels"] if needs else None


def _forward(model: nn.Module, module: nn.Module, batch: Mapping[str, torch.Tensor], cfg: Any):
    o = cfg.objective
    return model(
        batch["gene_ids"],
        batch["values"],
        padding_mask=batch["padding_mask"],
        batch_labels=_batch_labels_for(module, batch),
        MVC=o.gepc_weight > 0,
        ECS=False,  # the objective computes ECS from cell_emb itself
        mvc_gene_ids=batch.get("all_gene_ids"),
    )


__all__ = []
