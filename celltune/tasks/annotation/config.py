"""Settings of ``celltune annotate train`` (defaults follow scGPT's annotation tutorial:
CLS objective only, non-zero genes, no masking, no batch labels)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celltune.errors import InputError
from celltune.model.finetune import FinetuneSpec
from celltune.train.config import TrainConfig


def _default_train() -> TrainConfig:
    """scGPT tutorial: lr 1e-4, batch 32, 10 epochs; best model by validation macro-F1."""
    return TrainConfig(
        epochs=10,
        lr=1e-4,
        batch_size=32,
        select_metric="val/macro_f1",
        select_mode="max",
        patience=3,
    )


@dataclass
class AnnotationConfig:
    """Everything annotation fine-tuning needs; ``config.yaml`` in the run directory."""

    label_key: str = "cell_type"
    batch_key: str | None = None
    layer: str | None = None
    gene_column: str | None = None
    # preprocessing (SPEC §1); n_hvg=None keeps every gene that passes the count filter
    filter_gene_by_counts: int | None = 3
    n_hvg: int | None = None
    n_bins: int = 51
    valid_fraction: float = 0.1
    min_class_cells: int = 10
    # tokens (SPEC §2)
    include_zero_gene: bool = False
    max_seq_len: int = 3001
    mask_ratio: float = 0.0
    # model (SPEC §3); with ``pretrained`` the trunk sizes come from its args.json
    pretrained: str | None = None
    #: which weights train (``--finetune full | lora | freeze``), see celltune.model.finetune
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    d_model: int = 128
    nhead: int = 4
    d_hid: int = 128
    nlayers: int = 4
    nlayers_cls: int = 3
    dropout: float = 0.2
    # objective: CE on the cell embedding, optional masked-expression and DAB terms
    cls_weight: float = 1.0
    mlm_weight: float = 0.0
    dab_weight: float = 0.0
    balanced: bool = False
    train: TrainConfig = field(default_factory=_default_train)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> AnnotationConfig:
        from celltune.tasks.config import config_from_dict

        data = dict(data or {})
        if isinstance(data.get("finetune"), str):  # ``finetune: lora`` = the mode alone
            data["finetune"] = {"mode": data["finetune"]}
        return config_from_dict(cls, data)

    def validate(self) -> None:
        """Reject impossible settings before any data is read (each names its fix)."""
        self.finetune.validate()
        if not 0.0 < self.valid_fraction < 1.0:
            raise InputError(
                f"--valid-fraction must be in (0, 1), got {self.valid_fraction}; 0.1 is usual"
            )
        if self.mlm_weight > 0 and not 0.0 < self.mask_ratio < 1.0:
            raise InputError(
                "--mlm-weight > 0 needs masked inputs: pass --mask-ratio in (0, 1), e.g. 0.4"
            )
        if self.dab_weight > 0 and not self.batch_key:
            raise InputError("--dab-weight > 0 needs --batch-key (the batches DAB removes)")
        if min(self.cls_weight, self.mlm_weight, self.dab_weight) < 0 or self.cls_weight == 0:
            raise InputError("--cls-weight must be > 0 and the other weights >= 0")
        if self.max_seq_len < 2:
            raise InputError(f"--max-seq-len must be >= 2 (got {self.max_seq_len})")
