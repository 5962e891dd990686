"""Fine-tuning modes for a :class:`CellTransformer`: ``full``, ``lora`` (peft) or ``freeze``.

Why a separate module: tasks (integration, perturbation, annotation) differ in data and
heads but share how much of a pretrained trunk they update. One call after the model is
built and its pretrained weights loaded::

    apply_finetune(model, FinetuneSpec(mode="lora", lora_rank=8))

- ``full``: every parameter trains (the default, what scGPT does).
- ``lora``: peft LoRA adapters on the transformer's linear layers (``in_proj`` = packed
  q/k/v, ``out_proj``, ``linear1``, ``linear2`` by default); the trunk (gene and value
  embeddings, transformer) is frozen, the task heads and batch modules still train.
- ``freeze``: the gene/value embeddings and the first ``freeze_layers`` transformer
  layers are frozen; the rest trains.

A LoRA model is merged (``merge_lora``) before it is saved, so the saved directory is a
plain scGPT model directory (``in_proj_weight`` keys) that any scGPT tool loads.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from celltune.errors import InputError

logger = logging.getLogger(__name__)

FINETUNE_MODES = ("full", "lora", "freeze")
DEFAULT_LORA_TARGETS = ("in_proj", "out_proj", "linear1", "linear2")
# parameters that make up the pretrained trunk (frozen by "lora", embeddings by "freeze")
EMBEDDING_PREFIXES = ("encoder.", "value_encoder.")
TRUNK_PREFIXES = (*EMBEDDING_PREFIXES, "transformer_encoder.")


@dataclasses.dataclass
class FinetuneSpec:
    """How much of the model trains; see the module docstring.

    It is also the ``finetune`` section of every task's config (``finetune.mode``,
    ``finetune.lora_rank``, ...), so the three commands share one schema and one code path.
    """

    mode: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    freeze_layers: int = 0

    def validate(self, nlayers: int | None = None) -> None:
        """One InputError naming the bad setting and the fix (``freeze_layers`` is checked
        against ``nlayers`` once the model, possibly a pretrained one, is known)."""
        if self.mode not in FINETUNE_MODES:
            raise InputError(
                f"--finetune {self.mode!r} is not a fine-tuning mode; use one of {FINETUNE_MODES}"
            )
        if self.mode == "lora" and (self.lora_rank < 1 or self.lora_alpha <= 0):
            raise InputError(
                f"LoRA needs lora_rank >= 1 and lora_alpha > 0 (got rank {self.lora_rank}, "
                f"alpha {self.lora_alpha}); e.g. --lora-rank 8 --lora-alpha 16"
            )
        if self.freeze_layers < 0:
            raise InputError(f"--freeze-layers must be >= 0 (got {self.freeze_layers})")
        if self.mode == "freeze" and nlayers is not None and self.freeze_layers > nlayers:
            raise InputError(
                f"--freeze-layers {self.freeze_layers} is outside [0, {nlayers}] (the model "
                f"has {nlayers} transformer layers)"
            )


def _linear_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the linear layers (what LoRA targets may name)."""
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    )


def _apply_lora(model: nn.Module, spec: FinetuneSpec) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(spec.lora_targets)
    transformer = getattr(model, "transformer_encoder", None)
    if transformer is None:
        raise InputError("LoRA needs a model with a transformer_encoder (a CellTransformer)")
    available = _linear_names(transformer)
    # every name must match: a typo in one would otherwise silently leave its layers frozen
    unmatched = [t for t in targets if t not in available]
    if unmatched or not targets:
        raise InputError(
            f"--lora-targets {','.join(unmatched) or '(none)'} match no linear layer of "
            f"this model's transformer; its linear layers are named {', '.join(available)} "
            f"(e.g. --lora-targets {','.join(DEFAULT_LORA_TARGETS)})"
        )
    config = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    # adapters only on the transformer, never on heads that happen to share a name
    inject_adapter_in_model(config, transformer)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or not name.startswith(TRUNK_PREFIXES)


def _apply_freeze(model: nn.Module, spec: FinetuneSpec) -> None:
    frozen_layers = tuple(f"transformer_encoder.layers.{i}." for i in range(spec.freeze_layers))
    for name, param in model.named_parameters():
        if name.startswith(EMBEDDING_PREFIXES + frozen_layers):
            param.requires_grad = False


def apply_finetune(
    model: nn.Module, spec: FinetuneSpec | None = None, *, pretrained: bool = True
) -> nn.Module:
    """Set which parameters train (in place); returns the model for chaining.

    Call it before the optimizer is built: the trainer only optimises parameters with
    ``requires_grad``. ``pretrained=False`` (a model trained from scratch) warns for
    ``lora`` / ``freeze``: they would keep randomly initialised weights fixed.
    """
    spec = spec or FinetuneSpec()
    nlayers = len(getattr(getattr(model, "transformer_encoder", None), "layers", []))
    spec.validate(nlayers)
    if spec.mode != "full" and not pretrained:
        logger.warning(
            "--finetune %s without --pretrained: the frozen weights stay at their random "
            "initialisation; pass --pretrained MODEL_DIR to fine-tune a trained model",
            spec.mode,
        )
    if spec.mode == "lora":
        _apply_lora(model, spec)
    elif spec.mode == "freeze":
        _apply_freeze(model, spec)
    logger.info("fine-tuning %s: %s", spec.mode, trainable_summary(model))
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether peft LoRA layers are injected in ``model``.

    Decided from module types' names, so saving a plain model never imports peft (and
    transformers, seconds of import time)."""
    return any(type(m).__module__.startswith("peft.tuners.lora") for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base linear layer and remove the adapter (in place).

    The result has the plain architecture again, so its state dict is scGPT's.
    """
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad = True
    return model


def trainable_summary(model: nn.Module) -> str:
    """'N of M parameters train (p%)' for logs and reports."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{train:,} of {total:,} parameters train ({100 * train / max(total, 1):.1f}%)"
