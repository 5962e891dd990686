"""Settings and result of the integration task: ``config.yaml`` is :class:`IntegrationConfig`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from celltune.errors import InputError
from celltune.model.finetune import FinetuneSpec
from celltune.tasks.config import load_config
from celltune.train.config import TrainConfig

if TYPE_CHECKING:
    from anndata import AnnData
    from torch import nn


EMBEDDING_KEY = "X_celltune"


SPLIT_KEY = "celltune_split"


#: Sidecar in a model directory with what scGPT's ``args.json`` does not carry (batch
#: categories, tokenisation) so that ``embed`` reproduces the fine-tuned run's embedding.
TASK_FILE = "celltune_task.json"


KNOWN_BASELINES = ("pca", "harmony", "scvi")


_RESUME_MAY_CHANGE = (
    "train.epochs",
    "train.quiet",
    "train.log_every",
    "train.num_workers",
    "train.pin_memory",
    "train.device",
    "train.patience",
    "train.checkpoint_every",
    "eval",
)


@dataclass
class DataSection:
    """Input columns and SPEC §1 preprocessing (defaults = scGPT's integration script)."""

    batch_key: str | None = None
    label_key: str | None = None
    layer: str | None = None
    gene_column: str | None = None
    data_is_raw: bool = True
    filter_gene_by_counts: int | None = 3
    filter_cell_by_counts: int | None = None
    normalize_total: float | None = 1e4
    log1p: bool = True
    n_hvg: int | None = 1200
    hvg_flavor: str | None = None
    n_bins: int = 51
    valid_fraction: float = 0.1
    min_batch_cells: int = 20
    max_cells: int | None = None
    # Streaming from the on-disk file (``--stream``): rows are read chunk by chunk, so
    # memory does not grow with the number of cells (see tasks/integration/stream.py).
    stream: bool = False
    stream_sample_cells: int = 50_000
    chunk_size: int = 1024
    buffer_chunks: int = 8


@dataclass
class TokenSection:
    """Tokenisation (SPEC §2). ``max_seq_len`` counts ``<cls>``; ``mask_cls=False`` never
    masks the ``<cls>`` position (the reference can; excluding it is the cleaner choice)."""

    include_zero_gene: bool = True
    max_seq_len: int = 1201
    mask_ratio: float = 0.4
    mask_value: float = -1.0
    pad_value: float = -2.0
    mask_cls: bool = False
    # Mini-batches of cells of similar length (data.sampler.LengthBucketedSampler).
    length_buckets: bool = True


@dataclass
class ModelSection:
    """Architecture (SPEC §3). With ``pretrained`` the trunk sizes come from its args.json."""

    pretrained: str | None = None
    # load a pretrained directory whose weights cover < 90% of the model (reported)
    allow_partial: bool = False
    # auto | scratch | scgpt (tasks.integration.recipe): the settings a run gets unless set
    recipe: str = "auto"
    d_model: int = 128
    nhead: int = 4
    d_hid: int = 128
    nlayers: int = 4
    nlayers_cls: int = 3
    dropout: float = 0.2
    attn_dropout: float = 0.0
    input_emb_style: str = "continuous"
    cell_emb_style: str = "cls"
    mvc_decoder_style: str = "inner product"
    pre_norm: bool = False
    explicit_zero_prob: bool = True
    use_batch_labels: bool = True
    dab: bool = True
    dsbn: bool = True
    dsbn_mode: str = "per_cell"
    #: "random" (scGPT) or "pca": from scratch, gene embeddings start as the HVGs' PCA
    #: loadings on the binned training cells (needs objective.gepc_genes=all)
    gene_init: str = "random"


@dataclass
class ObjectiveSection:
    """SPEC §4 integration objective: one weight per term; a weight of 0 switches it off
    (and the head it needs is not computed)."""

    mse_weight: float = 1.0
    zero_prob_weight: float = 1.0
    gepc_weight: float = 1.0
    gepc_zero_prob_weight: float = 1.0
    ecs_weight: float = 10.0
    ecs_threshold: float = 0.8
    dab_weight: float = 1.0
    # not scGPT: VICReg-style variance + covariance of the cell embedding in a mini-batch
    # (celltune.losses.functional.spread_loss), against the collapse onto one axis
    spread_weight: float = 0.0
    # "input": GEPC predicts the input tokens' values (scGPT); "all": every HVG from the
    # cell embedding, zeros included, so the embedding must encode which genes are off
    # even when the tokens leave zeros out (tokens.include_zero_gene=false).
    gepc_genes: str = "input"


@dataclass
class EvalSection:
    """Evaluation after training (used by the ``integrate`` command), and the per-epoch
    embedding health checks on at most ``health_cells`` validation cells (0: off)."""

    eval_cells: int | None = None
    health_cells: int = 1000
    baselines: list[str] = field(default_factory=lambda: list(KNOWN_BASELINES))
    clustering: str = "leiden"
    scvi_max_epochs: int | None = None
    umap: bool = True


def _default_train() -> TrainConfig:
    """SPEC §4 training defaults; best model and early stopping on validation MSE."""
    return TrainConfig(select_metric="val/mse", select_mode="min", patience=5)


@dataclass
class IntegrationConfig:
    """Everything ``celltune integrate`` needs; ``config.yaml`` is this tree, resolved."""

    data: DataSection = field(default_factory=DataSection)
    tokens: TokenSection = field(default_factory=TokenSection)
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    #: which weights train (``--finetune full | lora | freeze``), see celltune.model.finetune
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    train: TrainConfig = field(default_factory=_default_train)
    eval: EvalSection = field(default_factory=EvalSection)

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
    ) -> IntegrationConfig:
        """``defaults < YAML < overrides`` (see :func:`celltune.tasks.config.load_config`)."""
        return load_config(path, overrides, schema=cls)

    def validate(self) -> None:
        """Reject impossible settings before any data is touched (each names its fix)."""
        if not self.data.batch_key:
            raise InputError(
                "no batch column given: pass --batch-key COLUMN (the obs column that names "
                "each cell's batch), or set data.batch_key in the config"
            )
        self.validate_settings()

    def validate_settings(self) -> None:
        """The checks that need no batch column (shared with ``celltune pretrain``)."""
        d, t, o = self.data, self.tokens, self.objective
        self.finetune.validate()
        if not 0.0 < d.valid_fraction < 1.0:
            raise InputError(
                f"data.valid_fraction must be in (0, 1), got {d.valid_fraction}; scGPT uses 0.1"
            )
        if d.max_cells is not None and d.max_cells < 10:
            raise InputError(f"data.max_cells must be >= 10 (got {d.max_cells}) or unset")
        if self.model.gene_init not in ("random", "pca"):
            raise InputError(f"model.gene_init must be random or pca, got {self.model.gene_init!r}")
        if d.stream_sample_cells < 100:
            raise InputError(
                f"--stream-sample-cells must be >= 100 (got {d.stream_sample_cells}): HVGs "
                "are chosen on that sample"
            )
        if d.chunk_size < 1 or d.buffer_chunks < 1:
            raise InputError(
                f"--chunk-size and --buffer-chunks must be >= 1 (got {d.chunk_size}, "
                f"{d.buffer_chunks})"
            )
        if t.max_seq_len < 2:
            raise InputError(f"--max-seq-len must be >= 2 (got {t.max_seq_len}): <cls> + genes")
        if not 0.0 < t.mask_ratio < 1.0:
            raise InputError(f"tokens.mask_ratio must be in (0, 1), got {t.mask_ratio}")
        for name in (
            "mse_weight",
            "zero_prob_weight",
            "gepc_weight",
            "gepc_zero_prob_weight",
            "ecs_weight",
            "spread_weight",
            "dab_weight",
        ):
            if getattr(o, name) < 0:
                raise InputError(f"objective.{name} must be >= 0 (0 switches the term off)")
        if o.mse_weight == 0 and o.gepc_weight == 0:
            raise InputError(
                "objective.mse_weight and objective.gepc_weight are both 0: the model would "
                "learn no expression; keep at least one > 0"
            )
        if o.gepc_genes not in ("input", "all"):
            raise InputError(f"objective.gepc_genes must be 'input' or 'all', got {o.gepc_genes!r}")
        unknown = [b for b in self.eval.baselines if b not in KNOWN_BASELINES]
        if unknown:
            raise InputError(
                f"unknown baseline(s) {', '.join(unknown)}: choose from "
                f"{','.join(KNOWN_BASELINES)} (e.g. --baselines pca,harmony)"
            )
        if self.eval.eval_cells is not None and self.eval.eval_cells < 20:
            raise InputError(f"--eval-cells must be >= 20 (got {self.eval.eval_cells}) or unset")


@dataclass
class IntegrationResult:
    """What :func:`integrate` returns.

    ``adata``: the input cells (after cell filtering / ``max_cells``) with all input genes,
    ``obsm['X_celltune']`` and ``obs['celltune_split']``. ``processed``: the preprocessed,
    HVG-restricted AnnData the model saw (``layers['X_normed']``/``['X_binned']``, also with
    the embedding), which baselines should use. ``metrics`` is filled by the evaluation step.
    """

    adata: AnnData
    processed: AnnData
    model: nn.Module
    vocab: Any
    config: IntegrationConfig
    history: pd.DataFrame
    best_epoch: int | None
    stopped_early: bool
    out_dir: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    train_seconds: float = 0.0
    n_genes_matched: int | None = None
    metrics: pd.DataFrame | None = None


__all__ = [
    "EMBEDDING_KEY",
    "KNOWN_BASELINES",
    "SPLIT_KEY",
    "TASK_FILE",
    "DataSection",
    "EvalSection",
    "IntegrationConfig",
    "IntegrationResult",
    "ModelSection",
    "ObjectiveSection",
    "TokenSection",
]
