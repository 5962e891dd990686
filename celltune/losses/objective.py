"""Training objectives: named, switchable weights over the loss terms.

The integration objective is ``finetune_integration.py``'s sum (SPEC §4) with its magic
numbers as named options. Terms are returned *unweighted* (as scGPT logs them) next to
the weighted total, so each can be plotted on its own scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from celltune.errors import InputError
from celltune.losses.functional import (
    bernoulli_nll,
    cross_entropy,
    ecs_loss,
    masked_mse,
    spread_loss,
)


@dataclasses.dataclass
class ObjectiveWeights:
    """Weights of the integration terms; a weight of 0 switches its term off."""

    mlm: float = 1.0
    zero_prob: float = 1.0
    gepc: float = 1.0
    gepc_zero_prob: float = 1.0
    ecs_weight: float = 10.0
    ecs_threshold: float = 0.8
    dab_weight: float = 1.0
    cls_weight: float = 0.0
    cce_weight: float = 0.0
    spread_weight: float = 0.0  # not scGPT: see celltune.losses.functional.spread_loss


class IntegrationObjective:
    """mse + zero_prob + gepc + gepc_zero_prob + ecs_weight·ecs + dab_weight·dab (+ cls, cce).

    A term is computed when its weight is non-zero and the model produced its output
    (e.g. ``mlm_zero_probs`` only with ``explicit_zero_prob``), so the same object serves
    models with and without each head.
    """

    def __init__(self, weights: ObjectiveWeights | None = None) -> None:
        self.weights = weights or ObjectiveWeights()

    def __call__(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch`` holds ``target_values`` (B, L), ``batch_labels``, ``celltype_labels``;
        ``mask`` (B, L) bool marks the scored (masked) positions."""
        w = self.weights
        if "target_values" not in batch:
            raise InputError("the objective needs batch['target_values'] (the unmasked values)")
        target = batch["target_values"]
        terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=target.device)

        def add(name: str, weight: float, value: Tensor) -> None:
            nonlocal total
            terms[name] = value
            total = total + weight * value

        if w.mlm and "mlm_output" in outputs:
            add("loss_mse", w.mlm, masked_mse(outputs["mlm_output"], target, mask))
        if w.zero_prob and "mlm_zero_probs" in outputs:
            add(
                "loss_zero_log_prob",
                w.zero_prob,
                bernoulli_nll(outputs["mlm_zero_probs"], target, mask),
            )
        g_target, g_mask = target, mask
        all_values = batch.get("all_values")
        if (
            "mvc_output" in outputs
            and all_values is not None
            and (outputs["mvc_output"].shape == all_values.shape)
        ):  # GEPC over every gene (mvc_gene_ids): all of them are scored
            g_target = all_values
            g_mask = torch.ones_like(g_target, dtype=torch.bool)
        if w.gepc and "mvc_output" in outputs:
            add("loss_gepc", w.gepc, masked_mse(outputs["mvc_output"], g_target, g_mask))
        if w.gepc_zero_prob and "mvc_zero_probs" in outputs:
            add(
                "loss_gepc_zero_log_prob",
                w.gepc_zero_prob,
                bernoulli_nll(outputs["mvc_zero_probs"], g_target, g_mask),
            )
        if w.ecs_weight and w.ecs_threshold > 0 and "cell_emb" in outputs:
            add("loss_ecs", w.ecs_weight, ecs_loss(outputs["cell_emb"], w.ecs_threshold))
        if w.spread_weight and "cell_emb" in outputs:
            add("loss_spread", w.spread_weight, spread_loss(outputs["cell_emb"]))
        if w.dab_weight and "dab_output" in outputs:
            if "batch_labels" not in batch:
                raise InputError("the DAB term needs batch['batch_labels']")
            add(
                "loss_dab",
                w.dab_weight,
                cross_entropy(outputs["dab_output"], batch["batch_labels"]),
            )
        if w.cls_weight and "cls_output" in outputs:
            labels = batch.get("celltype_labels")
            if labels is None or bool((labels < 0).all()):
                raise InputError(
                    "the CLS term needs batch['celltype_labels'] (pass a cell-type column) "
                    "or set cls_weight=0"
                )
            add("loss_cls", w.cls_weight, cross_entropy(outputs["cls_output"], labels))
        if w.cce_weight and "loss_cce" in outputs:
            add("loss_cce", w.cce_weight, outputs["loss_cce"])
        if not terms:
            raise InputError("no loss term applies: check the model outputs and the weights")
        return total, terms


class PerturbationObjective:
    """SPEC §6: MSE of ``mlm_output`` against the perturbed cell over all (non-pad) positions."""

    def __call__(
        self,
        outputs: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``mask`` defaults to every position that is not padding (``batch['padding_mask']``)."""
        target = batch["target_values"]
        if mask is None:
            pad = batch.get("padding_mask")
            mask = torch.ones_like(target, dtype=torch.bool) if pad is None else ~pad.bool()
        loss = masked_mse(outputs["mlm_output"], target, mask)
        return loss, {"loss_mse": loss}
