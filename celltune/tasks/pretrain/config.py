"""Settings of ``celltune pretrain``: the integration config tree with label-free defaults.

Pretraining reuses the integration model, objective, collators and training loop, so its
``config.yaml`` is :class:`~celltune.tasks.integration.IntegrationConfig` with other
defaults (no batch labels, DAB, DSBN or CLS; ECS off unless asked for; all genes, non-zero
genes as tokens) plus a ``pretrain`` section (vocabulary, ``--init`` model, gene checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from celltune.errors import InputError
from celltune.tasks.integration.config import (
    DataSection,
    IntegrationConfig,
    ModelSection,
    ObjectiveSection,
    TokenSection,
)
from celltune.train.config import TrainConfig


@dataclass
class PretrainSection:
    """Where the vocabulary comes from and how much a file must share with it."""

    #: a ``vocab.json`` (scGPT format); None: the union of the files' genes (or --init's).
    #: The model that starts the run (``--init``) is ``model.pretrained``.
    vocab: str | None = None
    #: with ``model.pretrained`` (``--init``): append the files' new genes to its
    #: vocabulary (True) or train on the genes it already has only (``--keep-vocab``)
    extend_vocab: bool = True
    #: a file whose genes match less than this fraction of a given vocabulary is refused
    min_vocab_match: float = 0.5
    #: a file sharing less than this fraction of its genes with the other files is refused
    min_gene_overlap: float = 0.1


def _data() -> DataSection:
    # every gene of every file (no HVG selection: the vocabulary is the union)
    return DataSection(n_hvg=None, filter_gene_by_counts=None)


def _tokens() -> TokenSection:
    return TokenSection(include_zero_gene=False, max_seq_len=1201)


def _model() -> ModelSection:
    return ModelSection(recipe="scgpt", use_batch_labels=False, dab=False, dsbn=False)


def _objective() -> ObjectiveSection:
    return ObjectiveSection(ecs_weight=0.0, dab_weight=0.0)


def _train() -> TrainConfig:
    return TrainConfig(select_metric="val/mse", select_mode="min", patience=5, epochs=10)


@dataclass
class PretrainConfig(IntegrationConfig):
    """Everything ``celltune pretrain`` needs; ``config.yaml`` is this tree, resolved."""

    data: DataSection = field(default_factory=_data)
    tokens: TokenSection = field(default_factory=_tokens)
    model: ModelSection = field(default_factory=_model)
    objective: ObjectiveSection = field(default_factory=_objective)
    train: TrainConfig = field(default_factory=_train)
    pretrain: PretrainSection = field(default_factory=PretrainSection)

    def validate(self) -> None:
        """Integration's checks minus the batch column, plus: no label-needing term."""
        self.validate_settings()
        m, o, p = self.model, self.objective, self.pretrain
        if m.dab or m.dsbn or m.use_batch_labels or o.dab_weight > 0:
            raise InputError(
                "pretraining is label-free: model.dab, model.dsbn, model.use_batch_labels and "
                "objective.dab_weight must be off (batch-aware terms belong to integrate)"
            )
        if p.vocab and m.pretrained:
            raise InputError(
                "--vocab and --init both give a vocabulary: --init uses the model's "
                "vocab.json (extended by the files' genes unless --keep-vocab); pass one"
            )
        for name in ("min_vocab_match", "min_gene_overlap"):
            if not 0.0 <= getattr(p, name) <= 1.0:
                raise InputError(f"pretrain.{name} must be in [0, 1] (0 turns the check off)")


__all__ = ["PretrainConfig", "PretrainSection"]
