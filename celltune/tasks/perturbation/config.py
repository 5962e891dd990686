"""Configuration of ``celltune perturb train`` (written to ``DIR/config.yaml``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from celltune.errors import InputError
from celltune.model.finetune import FinetuneSpec
from celltune.tasks.perturbation.pairing import INCLUDE_ZERO_CHOICES
from celltune.train.config import TrainConfig

logger = logging.getLogger(__name__)

CTRL = "ctrl"
PRETRAINED_PREFIXES = ("encoder", "value_encoder", "transformer_encoder")
SELECT_METRIC = "val/pearson_delta"


@dataclass
class PerturbDataConfig:
    """How cells become sequences (SPEC §6 defaults)."""

    include_zero_gene: str = "all"
    max_seq_len: int = 1536
    #: control cells averaged per perturbation in validation and ``evaluate``
    n_eval_ctrl: int = 300
    #: control cells stored with the run for ``predict``
    control_pool: int = 1000
    #: perturbed genes that are not measured (not in ``var``): ``token`` appends them as an
    #: extra flagged token (value 0, not scored) so their cells still train the model;
    #: ``exclude`` leaves their perturbations out of model training and evaluation
    unmeasured_targets: str = "token"
    #: cap on training target cells per condition, ``ctrl`` included (None = all); a
    #: CPU-budget knob: GEARS uses every cell
    max_cells_per_condition: int | None = None
    #: read the prepared file from disk row by row (``perturb train --stream``): obs is
    #: loaded, expression rows are read per mini-batch, so memory does not follow cells
    stream: bool = False
    #: rows per contiguous read of a streamed file (random rows: small spans)
    stream_chunk_rows: int = 256


@dataclass
class PerturbModelConfig:
    """Model size for training from scratch (a ``--pretrained`` model brings its own)."""

    d_model: int = 128
    nhead: int = 4
    d_hid: int = 128
    nlayers: int = 4
    #: scGPT's perturbation tutorial trains without dropout
    dropout: float = 0.0
    #: ``affine`` (coeff · input + bias: scGPT's ``TransformerGenerator`` decoder) or ``mlp``
    decoder: str = "affine"
    pre_norm: bool = False
    #: scGPT-format model directory; only ``encoder``, ``value_encoder`` and
    #: ``transformer_encoder`` are loaded, and its ``args.json`` sets the sizes above
    pretrained: str | None = None


def _default_train() -> TrainConfig:
    return TrainConfig(
        epochs=15,
        batch_size=64,
        lr=1e-4,
        gamma=0.9,
        patience=10,
        select_metric=SELECT_METRIC,
        select_mode="max",
        seed=0,
    )


@dataclass
class PerturbConfig:
    """Everything ``celltune perturb train`` needs; written to ``DIR/config.yaml``."""

    data: PerturbDataConfig = field(default_factory=PerturbDataConfig)
    model: PerturbModelConfig = field(default_factory=PerturbModelConfig)
    #: which weights train (``--finetune full | lora | freeze``), see celltune.model.finetune
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    train: TrainConfig = field(default_factory=_default_train)

    def validate(self) -> None:
        """Reject settings that would silently train the wrong thing."""
        self.finetune.validate()
        if self.data.include_zero_gene not in INCLUDE_ZERO_CHOICES:
            raise InputError(
                f"data.include_zero_gene must be one of {list(INCLUDE_ZERO_CHOICES)}, got "
                f"{self.data.include_zero_gene!r}; 'all' is scGPT's perturbation setting"
            )
        if self.data.unmeasured_targets not in ("token", "exclude"):
            raise InputError(
                "data.unmeasured_targets must be 'token' or 'exclude', got "
                f"{self.data.unmeasured_targets!r}"
            )
        for name in ("max_seq_len", "n_eval_ctrl", "control_pool", "stream_chunk_rows"):
            if getattr(self.data, name) < 1:
                raise InputError(f"data.{name} must be >= 1, got {getattr(self.data, name)}")
        if self.train.select_metric and self.train.select_metric.endswith("/pearson"):
            logger.warning(
                "selecting on absolute Pearson: it is ~0.99 for a model that copies its input; "
                "val/pearson_delta is the informative choice"
            )


def load_perturb_config(
    path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> PerturbConfig:
    """Defaults < YAML file < overrides (dotted keys, ``None`` = not given)."""
    from celltune.tasks.config import load_config

    cfg = load_config(path, overrides, schema=PerturbConfig)
    cfg.validate()
    return cfg
