"""Batch-integration fine-tuning: scGPT's ``finetune_integration.py`` as a function.

:func:`integrate` preprocesses (SPEC §1), builds or reuses a vocabulary, holds out a
seeded, batch-stratified validation set, fine-tunes with the full integration objective
(SPEC §4) through the one training loop (:class:`celltune.train.Trainer`), and embeds
every cell. :func:`embed` gives zero-shot embeddings from any model directory.

Evaluation (scIB metrics, baselines, plots, report) belongs to layers to the right of
``tasks`` (see ``docs/ARCHITECTURE.md``); the ``celltune integrate`` command chains them
(``celltune.report.integration_run.run_integrate`` is the Python equivalent of the command).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.errors import InputError
from celltune.files import write_json_atomic
from celltune.tasks.config import config_from_dict, diff_configs, dump_config, load_config
from celltune.train.config import TrainConfig

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from torch import nn

logger = logging.getLogger(__name__)

EMBEDDING_KEY = "X_celltune"
SPLIT_KEY = "celltune_split"
#: Sidecar in a model directory with what scGPT's ``args.json`` does not carry (batch
#: categories, tokenisation) so that ``embed`` reproduces the fine-tuned run's embedding.
TASK_FILE = "celltune_task.json"
KNOWN_BASELINES = ("pca", "harmony", "scvi")

# Settings a --resume may change without changing what the checkpoint means.
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


# ----------------------------------------------------------------------------- config
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
    # memory does not grow with the number of cells (see integration_stream).
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
    d_model: int = 128
    nhead: int = 4
    d_hid: int = 128
    nlayers: int = 4
    nlayers_cls: int = 3
    dropout: float = 0.2
    attn_dropout: float = 0.0
    input_emb_style: str = "continuous"
    cell_emb_style: str = "cls"
    pre_norm: bool = False
    explicit_zero_prob: bool = True
    use_batch_labels: bool = True
    dab: bool = True
    dsbn: bool = True
    dsbn_mode: str = "per_cell"


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
    # "input": GEPC predicts the input tokens' values (scGPT); "all": every HVG from the
    # cell embedding, zeros included, so the embedding must encode which genes are off
    # even when the tokens leave zeros out (tokens.include_zero_gene=false).
    gepc_genes: str = "input"


@dataclass
class EvalSection:
    """Evaluation after training (used by the ``integrate`` command, not by training)."""

    eval_cells: int | None = None
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
        d, t, o = self.data, self.tokens, self.objective
        if not d.batch_key:
            raise InputError(
                "no batch column given: pass --batch-key COLUMN (the obs column that names "
                "each cell's batch), or set data.batch_key in the config"
            )
        if not 0.0 < d.valid_fraction < 1.0:
            raise InputError(
                f"data.valid_fraction must be in (0, 1), got {d.valid_fraction}; scGPT uses 0.1"
            )
        if d.max_cells is not None and d.max_cells < 10:
            raise InputError(f"data.max_cells must be >= 10 (got {d.max_cells}) or unset")
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


# ----------------------------------------------------------------------------- result
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


# ----------------------------------------------------------------------------- checks
def _gene_names(adata: AnnData, gene_column: str | None) -> pd.Index:
    if gene_column is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_column not in adata.var.columns:
        raise InputError(
            f"gene column {gene_column!r} is not in var (columns: "
            f"{', '.join(map(str, adata.var.columns)) or 'none'}); omit it to use var_names"
        )
    return pd.Index(adata.var[gene_column].astype(str))


def _batch_categories(col: pd.Series) -> list[str]:
    """Category order = the column's categories when categorical (user order), else sorted."""
    values = col.astype(str)
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = set(values.unique())
        return [str(c) for c in col.cat.categories if str(c) in present]
    return sorted(values.unique())


def check_integration_input(adata: AnnData, cfg: IntegrationConfig) -> list[str]:
    """Validate the obs columns against the config; returns the batch categories.

    A single batch makes DAB and DSBN meaningless, so it is an error unless both were
    switched off explicitly; tiny batches only warn (they train, but their DSBN statistics
    and metrics are noisy).
    """
    from celltune.data import io

    if adata.n_obs < 20:
        raise InputError(
            f"only {adata.n_obs} cells: integration fine-tuning needs at least 20 "
            "(10% are held out for validation)"
        )
    assert cfg.data.batch_key is not None
    col = io.require_obs_column(adata, cfg.data.batch_key, "integration (--batch-key)")
    if cfg.data.label_key is not None:
        io.require_obs_column(adata, cfg.data.label_key, "evaluation (--label-key)")
    if not adata.obs_names.is_unique:
        raise InputError(
            "cell names (obs_names) are not unique, but celltune keys every cell's random "
            "draws and outputs on its name: call adata.obs_names_make_unique() first"
        )
    cats = _batch_categories(col)
    check_batch_counts(col.astype(str).value_counts(), cfg)
    return cats


def check_batch_counts(counts: pd.Series, cfg: IntegrationConfig) -> None:
    """Cells per batch (index = batch name) against the config's DAB/DSBN needs."""
    cats = [str(c) for c in counts.index]
    m = cfg.model
    if len(cats) < 2:
        if m.dab or m.dsbn:
            raise InputError(
                f"batch column {cfg.data.batch_key!r} holds a single batch ({cats[0]!r}): "
                "domain adaptation (DAB) and domain-specific batch norm (DSBN) need at least "
                "2 batches. Choose a column with several batches, or pass --no-dab --no-dsbn "
                "to fine-tune without them (nothing will be batch-corrected)"
            )
        logger.warning(
            "single batch %r: fine-tuning without DAB/DSBN as requested; batch metrics are skipped",
            cats[0],
        )
    small = counts[counts < cfg.data.min_batch_cells]
    if len(small):
        logger.warning(
            "batch(es) with fewer than %d cells: %s; their DSBN statistics and batch "
            "metrics will be noisy (consider merging or dropping them)",
            cfg.data.min_batch_cells,
            ", ".join(f"{k} ({v})" for k, v in small.items()),
        )


def stratified_split(
    batches: Iterable[Any], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation indices, ``fraction`` of every batch held out.

    Each batch with at least 2 cells contributes at least one validation cell, so the
    validation loss sees every domain (what DSBN/DAB are trained on).
    """
    b = np.asarray(list(batches)).astype(str)
    rng = np.random.default_rng([int(seed), 0x5E1])
    val: list[np.ndarray] = []
    for cat in sorted(np.unique(b)):
        idx = np.flatnonzero(b == cat)
        n_val = round(fraction * idx.size)
        n_val = min(max(n_val, 1), idx.size - 1) if idx.size >= 2 else 0
        val.append(rng.permutation(idx)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(b.size, dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def _subsample_cells(adata: AnnData, n: int, batch_key: str, seed: int) -> AnnData:
    """Seeded, batch-stratified subsample of ``n`` cells (for quick runs)."""
    if adata.n_obs <= n:
        return adata
    b = adata.obs[batch_key].astype(str).to_numpy()
    rng = np.random.default_rng([int(seed), 0xCE11])
    keep: list[np.ndarray] = []
    for cat in sorted(np.unique(b)):
        idx = np.flatnonzero(b == cat)
        k = max(1, round(n * idx.size / b.size))
        keep.append(rng.permutation(idx)[:k])
    sel = np.sort(np.concatenate(keep))
    logger.info("subsampled %d of %d cells (data.max_cells=%d)", sel.size, adata.n_obs, n)
    return adata[sel].copy()


# ----------------------------------------------------------------------------- model
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
        mvc_decoder_style="inner product",
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


# ----------------------------------------------------------------------------- shared steps
def resolve_config(config: IntegrationConfig | Mapping[str, Any] | None) -> IntegrationConfig:
    """A validated private copy of ``config`` (the caller's object is never changed)."""
    if config is None:
        cfg = IntegrationConfig()
    elif isinstance(config, IntegrationConfig):
        cfg = copy.deepcopy(config)
    else:
        cfg = config_from_dict(IntegrationConfig, config)
    cfg.validate()
    return cfg


def load_pretrained(cfg: IntegrationConfig) -> nn.Module | None:
    """The ``--pretrained`` model (None without one); ``cfg.model`` takes its architecture."""
    m, t = cfg.model, cfg.tokens
    if not m.pretrained:
        return None
    from celltune.model.checkpoint import load_model

    pretrained = load_model(m.pretrained, device="cpu")
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
    dense = cfg.objective.gepc_genes == "all" and cfg.objective.gepc_weight > 0
    train_coll = TokenCollator(mask_ratio=t.mask_ratio, dense_targets=dense, **kwargs)
    # The validation masks stay fixed (epoch 0) so val/mse is comparable across epochs.
    val_coll = TokenCollator(mask_ratio=t.mask_ratio, dense_targets=dense, **kwargs)
    embed_coll = TokenCollator(mask_ratio=0.0, **kwargs)
    return train_coll, val_coll, embed_coll


def task_record(cfg: IntegrationConfig, batch_cats: list[str], pp_cfg: Any) -> dict[str, Any]:
    """What ``celltune_task.json`` keeps so that ``embed`` reproduces this run's tokens."""
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
    }


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

    from celltune.losses import masked_mse
    from celltune.train import Trainer

    torch.manual_seed(cfg.train.seed)
    model = _build_model(cfg, vocab, n_batches, pretrained)
    model.vocab = vocab  # type: ignore[attr-defined]
    objective = _objective(cfg)
    mask_value = cfg.tokens.mask_value

    def step_fn(net: nn.Module, batch: Mapping[str, torch.Tensor], ctx: Any) -> Any:
        outputs = _forward(net, ctx.module, batch, cfg)
        mask = batch["values"].eq(mask_value) & ~batch["padding_mask"]
        return objective(outputs, batch, mask)

    def eval_fn(net: nn.Module, ctx: Any) -> dict[str, float]:
        sums: dict[str, float] = {}
        n_total = 0
        for batch in val_loader:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            with ctx.autocast():
                outputs = _forward(net, net, batch, cfg)
                mask = batch["values"].eq(mask_value) & ~batch["padding_mask"]
                loss, terms = objective(outputs, batch, mask)
                if "mse" not in terms:  # model selection uses it even when its weight is 0
                    terms["mse"] = masked_mse(outputs["mlm_output"], batch["target_values"], mask)
            n = int(batch["gene_ids"].shape[0])
            n_total += n
            sums["loss"] = sums.get("loss", 0.0) + float(loss) * n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
        return {f"val/{k}": v / max(n_total, 1) for k, v in sums.items()}

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


# ----------------------------------------------------------------------------- embedding
def embed_cells(
    model: nn.Module,
    dataset: Any,
    collator: Any,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    normalize: bool = True,
) -> np.ndarray:
    """Cell embeddings (cells × d, float32) in dataset order, L2-normalised as scGPT does.

    Eval mode, no masking, per-cell randomness (gene sub-sampling) keyed on the cell, and
    per-cell DSBN: a cell's embedding does not depend on the chunk it is computed in.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    out = np.zeros((len(dataset), model.config.d_model), dtype=np.float32)  # type: ignore[attr-defined]
    embed_into(out, model, loader, device=device, quiet=quiet, normalize=normalize)
    return out


def embed_into(
    out: np.ndarray,
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    position_of: Any = None,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    normalize: bool = True,
) -> None:
    """Write the embedding of every mini-batch of ``loader`` into rows of ``out``.

    ``out`` may be an on-disk ``np.memmap`` (streamed data: memory stays that of one
    mini-batch). Row = ``position_of(batch["cell_index"])`` (default: the cell index).
    """
    import torch
    from tqdm.auto import tqdm

    device = torch.device(device)
    model = model.to(device)
    was_training = model.training
    model.eval()
    total = len(loader) if hasattr(loader, "__len__") else None
    try:
        with torch.no_grad():
            for batch in tqdm(
                loader, desc="embedding", unit="batch", total=total, disable=quiet, leave=False
            ):
                idx = batch["cell_index"].numpy()
                if position_of is not None:
                    idx = position_of(idx)
                labels = _batch_labels_for(model, batch)
                emb = (
                    model.embed(  # type: ignore[attr-defined]
                        batch["gene_ids"].to(device),
                        batch["values"].to(device),
                        batch["padding_mask"].to(device),
                        batch_labels=None if labels is None else labels.to(device),
                    )
                    .float()
                    .cpu()
                    .numpy()
                )
                if normalize:
                    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
                out[idx] = emb
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- integrate
def _check_resume(cfg: IntegrationConfig, out_dir: Path, resume: bool) -> None:
    from celltune.train import CHECKPOINT_NAME

    ckpt = out_dir / CHECKPOINT_NAME
    saved = out_dir / "config.yaml"
    if not resume:
        if ckpt.is_file():
            raise InputError(
                f"{out_dir} already holds a training checkpoint ({CHECKPOINT_NAME}): pass "
                "--resume to continue that run, or choose a new --out directory"
            )
        return
    if not saved.is_file():
        return
    before = load_config(saved, schema=IntegrationConfig)
    changed = diff_configs(before, cfg, ignore=_RESUME_MAY_CHANGE)
    if changed:
        raise InputError(
            f"--resume with settings that differ from the checkpointed run in {out_dir} "
            f"({', '.join(changed)}): re-run with the original settings (see its "
            "config.yaml), or start a new run in another --out directory"
        )


def open_run_dir(
    cfg: IntegrationConfig, out_dir: str | Path | None, resume: bool
) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """The run directory (created; resume checked), or a temporary one for ``None``."""
    if out_dir is None:
        tmp_dir = tempfile.TemporaryDirectory(prefix="celltune-integrate-")
        return Path(tmp_dir.name), tmp_dir
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file; give a directory path for the run")
    from celltune.files import claim_run_dir
    from celltune.train import distributed as dist_utils

    if dist_utils.is_main_process():  # rank 0 owns (and alone writes) the run directory
        claim_run_dir(out)  # one owner per run directory; removes temp files of a killed run
    _check_resume(cfg, out, resume)
    return out, None


def _write_model_dir(model: nn.Module, vocab: Any, path: Path, task: Mapping[str, Any]) -> None:
    from celltune.model.checkpoint import save_model

    save_model(model, path, vocab)
    write_json_atomic(path / TASK_FILE, dict(task))


def integrate(
    adata: AnnData,
    config: IntegrationConfig | Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
) -> IntegrationResult:
    """Fine-tune a model for batch integration on ``adata`` and embed every cell.

    ``config``: an :class:`IntegrationConfig` (or a nested dict of the same shape).
    ``out_dir``: where ``config.yaml``, ``history.csv``, checkpoints, ``model/`` and
    ``integrated.h5ad`` go (``None``: a temporary directory, nothing kept).
    ``resume``: continue from ``out_dir/checkpoint.pt`` (same settings required).
    """

    from celltune.data import io
    from celltune.data.binning import cell_keys
    from celltune.data.dataset import CellDataset
    from celltune.data.preprocess import preprocess
    from celltune.data.sampler import BatchAwareSampler, LengthBucketedSampler
    from celltune.data.vocab import GeneVocab
    from celltune.train import distributed as dist_utils
    from celltune.train import input_fingerprint, make_loader

    t_start = time.perf_counter()
    dist_utils.init_distributed()  # under torchrun: samplers below must see the group
    cfg = resolve_config(config)
    d = cfg.data
    seed = cfg.train.seed
    quiet = cfg.train.quiet
    assert d.batch_key is not None

    batch_cats = check_integration_input(adata, cfg)  # before anything is written
    out, tmp_dir = open_run_dir(cfg, out_dir, resume)

    # 1. pretrained vocabulary, preprocessing -----------------------------------------
    pretrained = load_pretrained(cfg)
    n_matched = None
    ad_in = adata
    if pretrained is not None:
        vocab = pretrained.vocab
        match = vocab.match_genes(list(_gene_names(adata, d.gene_column)))  # logs the count
        n_matched = int(match.n_matched)
        ad_in = adata[:, np.asarray(match.matched, dtype=bool)]
    if d.max_cells is not None:
        ad_in = _subsample_cells(ad_in, d.max_cells, d.batch_key, seed)
    if out_dir is not None and dist_utils.is_main_process():  # after _check_resume
        dump_config(cfg, out / "config.yaml", header="celltune integrate: resolved configuration")

    pp_cfg = preprocess_config(cfg, len(batch_cats), ad_in.n_vars)
    pp = preprocess(ad_in, pp_cfg, quiet=quiet)
    genes = list(_gene_names(pp, d.gene_column))
    if pretrained is None:
        vocab = GeneVocab.from_genes(genes)
    gene_ids = np.asarray(vocab.match_genes(genes).ids, dtype=np.int64)

    # 2. split, datasets, loaders ------------------------------------------------------
    train_idx, val_idx = stratified_split(pp.obs[d.batch_key], d.valid_fraction, seed)
    split = np.full(pp.n_obs, "train", dtype=object)
    split[val_idx] = "valid"
    pp.obs[SPLIT_KEY] = pd.Categorical(split, categories=["train", "valid"])
    logger.info(
        "%s cells: %s train / %s validation, %d batches, %d genes",
        f"{pp.n_obs:,}",
        f"{train_idx.size:,}",
        f"{val_idx.size:,}",
        len(batch_cats),
        pp.n_vars,
    )
    ds_kwargs: dict[str, Any] = {
        "layer": "X_binned",
        "batch_key": d.batch_key,
        "batch_categories": batch_cats,
    }
    train_ds = CellDataset(pp[train_idx].copy(), gene_ids, **ds_kwargs)
    val_ds = CellDataset(pp[val_idx].copy(), gene_ids, **ds_kwargs)
    all_ds = CellDataset(pp, gene_ids, **ds_kwargs)
    train_coll, val_coll, embed_coll = collators(cfg, vocab, gene_ids)

    tc = cfg.train
    if cfg.model.dsbn:
        sampler_kwargs: dict[str, Any] = {
            "shuffle": True,
            "seed": seed,
            "num_replicas": dist_utils.world_size(),
            "rank": dist_utils.rank(),
        }
        if cfg.tokens.length_buckets:  # fewer padded tokens, same cells per epoch
            lengths = np.diff(train_ds.X.indptr)
            sampler = LengthBucketedSampler(
                train_ds.batch_labels, lengths, tc.batch_size, **sampler_kwargs
            )
        else:
            sampler = BatchAwareSampler(train_ds.batch_labels, tc.batch_size, **sampler_kwargs)
        train_loader = make_loader(train_ds, tc, collate_fn=train_coll, batch_sampler=sampler)
    else:
        train_loader = make_loader(train_ds, tc, collate_fn=train_coll, shuffle=True)
    val_loader = make_loader(val_ds, tc, collate_fn=val_coll, eval=True)

    # 3. model, objective, training ----------------------------------------------------
    trainer, history, model, train_seconds = train_integration_model(
        cfg,
        vocab,
        len(batch_cats),
        pretrained,
        train_loader,
        val_loader,
        out,
        resume,
        fingerprint=input_fingerprint(adata, vocab),
    )

    # 4. embed every cell, write outputs -----------------------------------------------
    emb = embed_cells(
        model,
        all_ds,
        embed_coll,
        batch_size=tc.eval_batch_size or tc.batch_size,
        device=trainer.device,
        quiet=quiet,
    )
    pp.obsm[EMBEDDING_KEY] = emb
    # All input genes, the cells that survived filtering / subsampling, in pp's order.
    result_ad = adata[pp.obs_names].copy()
    result_ad.obsm[EMBEDDING_KEY] = emb
    result_ad.obs[SPLIT_KEY] = pd.Categorical(split, categories=["train", "valid"])
    all_genes = _gene_names(result_ad, d.gene_column)
    result_ad.var["celltune_hvg"] = all_genes.isin(set(genes))
    task_info = task_record(cfg, batch_cats, pp_cfg)
    result_ad.uns["celltune"] = {
        "integration": {
            **task_info,
            "best_epoch": history.best_epoch,
            "best_val_mse": history.best_metric,
            "epochs_run": len(history),
            "train_seconds": round(train_seconds, 2),
            "cell_keys_of": "obs_names",
        }
    }
    _ = cell_keys  # documented key scheme (SPEC); imported so a missing layer fails early

    files: dict[str, Path] = {}
    if out_dir is not None and dist_utils.is_main_process():
        files["model"] = out / "model"
        _write_model_dir(model, vocab, files["model"], task_info)
        files["integrated"] = out / "integrated.h5ad"
        io.write_h5ad(result_ad, files["integrated"])
        files["history"] = trainer.history_path
        files["config"] = out / "config.yaml"
        files["checkpoint"] = trainer.checkpoint_path
    hist_df = pd.DataFrame(history.records)
    if tmp_dir is not None:
        tmp_dir.cleanup()
    logger.info("integration finished in %.1f s", time.perf_counter() - t_start)
    return IntegrationResult(
        adata=result_ad,
        processed=pp,
        model=model,
        vocab=vocab,
        config=cfg,
        history=hist_df,
        best_epoch=history.best_epoch,
        stopped_early=history.stopped_early,
        out_dir=None if out_dir is None else out,
        files=files,
        train_seconds=train_seconds,
        n_genes_matched=n_matched,
    )


# ----------------------------------------------------------------------------- embed
def resolve_embed_device(device: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` → a torch device (clear error without a GPU)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA GPU is available; use cpu")
    return torch.device(device)


def load_embedding_model(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a directory (with its vocabulary) and its ``celltune_task.json``."""
    from celltune.model.checkpoint import load_model

    model = load_model(model_dir, device="cpu")
    if model.vocab is None:
        raise InputError(f"{model_dir} has no vocab.json: a model directory needs one to embed")
    return model, _read_task_file(model_dir) or {}


def embedding_batch_categories(
    present: list[str] | None, task: Mapping[str, Any], mc: Any, model_dir: Path
) -> list[str] | None:
    """Batch category order for embedding: the run's own (``celltune_task.json``), then
    batches the model has not seen (pooled DSBN statistics). ``present=None``: no
    ``--batch-key``."""
    labels_needed = mc.use_batch_labels or mc.use_dsbn or mc.do_dab
    if present is None:
        if labels_needed:
            logger.info("no --batch-key: embedding without batch labels (pooled DSBN statistics)")
        return None
    known = task.get("batch_categories")
    if known is None:
        known = present
        if labels_needed:
            logger.warning(
                "%s has no %s: batch labels mapped by sorted order (%s) onto the "
                "model's %d batch slots",
                model_dir,
                TASK_FILE,
                ", ".join(f"{c}→{i}" for i, c in enumerate(known)),
                mc.num_batch_labels,
            )
    unseen = [c for c in present if c not in known]
    if unseen:
        logger.warning(
            "batches unknown to the model (%s): they use pooled DSBN statistics",
            ", ".join(unseen),
        )
    return [*known, *unseen]


def embedding_collator(
    model: nn.Module,
    task: Mapping[str, Any],
    gene_ids: np.ndarray,
    *,
    include_zero_gene: bool | None = None,
    max_seq_len: int | None = None,
    seed: int | None = None,
) -> Any:
    """The tokenisation of the run that wrote the model (``celltune_task.json``), else
    scGPT's ``embed_data`` conventions (non-zero genes, ≤ 1,200, ``<cls>`` = pad value)."""
    from celltune.data.dataset import TokenCollator

    tok = task.get("tokens", {})
    vocab = model.vocab  # type: ignore[attr-defined]
    zero_shot = not task
    pad_value = float(getattr(model.config, "pad_value", -2))  # type: ignore[attr-defined]
    return TokenCollator(
        n_genes=int(gene_ids.size),
        gene_ids=gene_ids,
        cls_id=vocab.cls_id,
        pad_id=vocab.pad_id,
        include_zero_gene=bool(
            tok.get("include_zero_gene", False) if include_zero_gene is None else include_zero_gene
        ),
        max_seq_len=int(max_seq_len or tok.get("max_seq_len", 1201)),
        pad_value=pad_value,
        cls_value=pad_value if zero_shot else 0,
        mask_ratio=0.0,
        seed=int(task.get("seed", 0) if seed is None else seed),
    )


def _read_task_file(model_dir: Path) -> dict[str, Any] | None:
    p = model_dir / TASK_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{p} is not valid JSON ({err}); delete it to embed zero-shot") from err


def embed(
    adata: AnnData,
    model_dir: str | Path,
    *,
    batch_key: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    key: str = EMBEDDING_KEY,
    layer: str | None = None,
    gene_column: str | None = None,
    max_seq_len: int | None = None,
    include_zero_gene: bool | None = None,
    seed: int | None = None,
    quiet: bool = False,
) -> AnnData:
    """Zero-shot cell embeddings from any scGPT-format model directory.

    Returns a copy of ``adata`` with ``obsm[key]`` (cells × d_model, L2-normalised).
    Genes are matched to the model's vocabulary by name (``gene_column`` or ``var_names``)
    and binned per cell (SPEC §1: binning raw counts equals binning normalised+log1p
    values). A directory written by ``celltune integrate`` carries its tokenisation and
    batch categories (``celltune_task.json``), so the fine-tuned run's embedding is
    reproduced; other directories follow scGPT's ``embed_data``: non-zero genes only, at
    most 1,200 genes, ``<cls>`` value = ``pad_value``. Cells whose batch is unknown to
    the model (or no ``batch_key``) use pooled DSBN statistics and no batch label.
    """
    import anndata

    from celltune.data import io
    from celltune.data.binning import bin_matrix, cell_keys
    from celltune.data.dataset import CellDataset

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1 (got {batch_size})")
    mdir = Path(model_dir)
    dev = resolve_embed_device(device)
    model, task = load_embedding_model(mdir)
    vocab = model.vocab
    mc = model.config
    if gene_column is None:
        gene_column = task.get("gene_column")
        if gene_column is not None and gene_column not in adata.var.columns:
            gene_column = None
    match = vocab.match_genes(list(_gene_names(adata, gene_column)))  # logs the count
    matched = np.asarray(match.matched, dtype=bool)
    X = io.get_matrix(adata, layer)
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    X = X[:, matched]
    io.check_finite_nonnegative(X, "X" if layer is None else f"layer {layer!r}")
    n_bins = int(task.get("n_bins", getattr(mc, "n_input_bins", 51) or 51))
    data_seed = int(task.get("seed", 0) if seed is None else seed)
    binned = bin_matrix(X, n_bins, data_seed, cell_keys(adata.obs_names), quiet=quiet)
    work = anndata.AnnData(X=binned, obs=pd.DataFrame(index=adata.obs_names.copy()))
    work.layers["X_binned"] = binned

    present = None
    if batch_key is not None:
        col = io.require_obs_column(adata, batch_key, "batch-aware embedding (--batch-key)")
        work.obs[batch_key] = col.astype(str).to_numpy()
        present = _batch_categories(col)
    batch_cats = embedding_batch_categories(present, task, mc, mdir)
    ds = CellDataset(
        work,
        np.asarray(match.ids, dtype=np.int64)[matched],
        layer="X_binned",
        batch_key=batch_key,
        batch_categories=batch_cats,
    )
    zero_shot = not task
    collator = embedding_collator(
        model,
        task,
        np.asarray(match.ids, dtype=np.int64)[matched],
        include_zero_gene=include_zero_gene,
        max_seq_len=max_seq_len,
        seed=data_seed,
    )
    emb = embed_cells(model, ds, collator, batch_size=batch_size, device=dev, quiet=quiet)
    out = adata.copy()
    out.obsm[key] = emb
    out.uns.setdefault("celltune", {})
    out.uns["celltune"] = {
        **dict(out.uns["celltune"]),
        "embed": {
            "model_dir": str(mdir),
            "key": key,
            "n_genes_matched": int(match.n_matched),
            "batch_key": batch_key,
            "zero_shot_tokenisation": zero_shot,
        },
    }
    return out


__all__ = [
    "EMBEDDING_KEY",
    "DataSection",
    "EvalSection",
    "IntegrationConfig",
    "IntegrationResult",
    "ModelSection",
    "ObjectiveSection",
    "TokenSection",
    "check_integration_input",
    "embed",
    "embed_cells",
    "integrate",
    "stratified_split",
]
