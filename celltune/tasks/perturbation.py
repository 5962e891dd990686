"""Perturbation response prediction: train / predict (SPEC §6–7, issue 5).

scGPT's perturbation fine-tuning (``TransformerGenerator``) as a tool: a control cell's
expression goes in with a flag on the perturbed genes, the perturbed expression comes out.
What differs from the reference, and why:

- the perturbed genes are always inside a cut sequence (scGPT issue #298);
- the model is selected on validation ``pearson_delta`` (absolute Pearson is ~0.99 for any
  model that copies its input, so it cannot tell models apart);
- predictions are clipped at 0 (log-expression cannot be negative; GEARS issue #30);
- a perturbed gene that is not measured (not in ``var``; e.g. 16 of Papalexi's 25 targets)
  has no input position for its flag. With ``data.unmeasured_targets="token"`` (default) it
  is appended as one extra token (its gene id, value 0, flag 1) that is never scored, so
  its cells still train the model; ``"exclude"`` leaves such perturbations out of the
  model's training (counted in ``run.json``). A gene that is neither measured nor flagged
  in training has an untrained embedding: predictions for it are reported, with a warning.

Evaluation (metrics, baselines, plots) sits to the right of ``tasks`` and lives in
``celltune.report.perturbation_run.evaluate_perturbation_run``.

Run directory written by :func:`train_perturbation_model`::

    DIR/model/          scGPT-format model (args.json, vocab.json, best_model.pt, ...)
    DIR/config.yaml     the fully resolved configuration (reproduce / resume from it)
    DIR/history.csv     one row per epoch (train loss, val/pearson_delta, ...)
    DIR/controls.h5ad   the control-cell pool that ``predict`` averages over
    DIR/run.json        data path, gene and perturbation counts, exclusions, timings
    DIR/checkpoint.pt, DIR/best_state.pt   training loop state (resume)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from celltune.errors import InputError
from celltune.files import atomic_path, write_json_atomic
from celltune.tasks.perturbation_data import (
    INCLUDE_ZERO_CHOICES,
    PerturbationCollator,
    PerturbationPairs,
    build_batch,
    inference_chunks,
    stable_cell_keys,
)
from celltune.train.config import TrainConfig

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

CTRL = "ctrl"
PRETRAINED_PREFIXES = ("encoder", "value_encoder", "transformer_encoder")
SELECT_METRIC = "val/pearson_delta"


# ------------------------------------------------------------------ configuration


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
    train: TrainConfig = field(default_factory=_default_train)

    def validate(self) -> None:
        """Reject settings that would silently train the wrong thing."""
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
        for name in ("max_seq_len", "n_eval_ctrl", "control_pool"):
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


# ------------------------------------------------------------------ prepared data


@dataclass
class PerturbationData:
    """A prepared AnnData resolved against a model's gene list.

    ``cols_of[cond]``: columns flagged for ``cond`` (None when a gene is not in the gene
    list, i.e. the model cannot represent the perturbation). Columns ``>= n_measured`` are
    token-only columns of unmeasured perturbed genes (all zero in ``X``).
    """

    adata: AnnData
    X: sp.csr_matrix
    genes: np.ndarray
    conditions: np.ndarray
    split: np.ndarray
    keys: np.ndarray
    cols_of: dict[str, np.ndarray | None]
    n_measured: int

    @property
    def control_rows(self) -> np.ndarray:
        return np.flatnonzero(self.conditions == CTRL)

    def placeable(self, cond: str) -> bool:
        """The model can flag every gene of ``cond`` (measured or as an extra token)."""
        return cond == CTRL or self.cols_of.get(cond) is not None

    def measured(self, cond: str) -> bool:
        """Every gene of ``cond`` is a measured gene (its flag sits on an input value)."""
        cols = self.cols_of.get(cond)
        return cond == CTRL or (cols is not None and bool((cols < self.n_measured).all()))

    def perturbations(self, split: str | None = None) -> list[str]:
        """Non-control conditions (in first-seen order), optionally of one split."""
        mask = self.conditions != CTRL
        if split is not None:
            mask &= self.split == split
        return [str(c) for c in pd.unique(self.conditions[mask])]


def check_prepared(adata: AnnData, source: str = "the data") -> None:
    """The train step needs ``celltune perturb prepare`` output; say so if it got anything else."""
    from celltune.data.io import looks_log_transformed

    fix = "Fix: run 'celltune perturb prepare RAW.h5ad --out DATA.h5ad' and train on DATA.h5ad."
    if "condition" not in adata.obs.columns:
        raise InputError(f"{source} has no obs['condition'] column. {fix}")
    if "split" not in adata.obs.columns:
        raise InputError(f"{source} has no obs['split'] (train/val/test) column. {fix}")
    X = adata.X
    data = np.asarray(X.data if sp.issparse(X) else np.asarray(X).ravel())
    if data.size and not np.all(np.isfinite(data)):
        raise InputError(f"{source}: X holds NaN or infinite values. {fix}")
    if data.size and np.all(data == np.round(data)) and float(data.max()) > 30:
        raise InputError(
            f"{source}: X looks like raw counts (integers up to {float(data.max()):g}); the "
            f"model is trained on normalised + log1p expression. {fix}"
        )
    if data.size and not looks_log_transformed(X):
        logger.warning("%s: X does not look log1p-transformed; used as is", source)
    cond = adata.obs["condition"].astype(str).to_numpy()
    if not (cond == CTRL).any():
        raise InputError(
            f"{source} has no control cells (condition 'ctrl'): the model needs control cells "
            f"as inputs. {fix}"
        )
    split = adata.obs["split"].astype(str).to_numpy()
    if not ((cond == CTRL) & (split == "train")).any():
        raise InputError(
            f"{source}: no control cells in the training split; re-run 'celltune perturb "
            "prepare' (it puts 'ctrl' in train)"
        )


def resolve_data(
    adata: AnnData,
    genes: Sequence[str],
    source: str = "the data",
    extra_genes: Sequence[str] = (),
) -> PerturbationData:
    """Restrict ``adata`` to ``genes`` (model gene list, in that order) and map conditions.

    ``extra_genes`` (unmeasured perturbed genes) become all-zero token-only columns after
    the measured ones.
    """
    from celltune.data.gears import gene_symbols, parse_condition

    symbols = np.asarray(gene_symbols(adata))
    pos = {g: i for i, g in reversed(list(enumerate(symbols)))}
    take = np.array([pos.get(g, -1) for g in genes], dtype=np.int64)
    if (take < 0).any():
        missing = [g for g, t in zip(genes, take, strict=True) if t < 0]
        raise InputError(
            f"{source} lacks {len(missing)} gene(s) of the model: {', '.join(missing[:10])}. "
            "Fix: evaluate on the data the model was trained on (same 'prepare' output)."
        )
    X = adata.X
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    X = X[:, take].astype(np.float32)
    if len(extra_genes):
        X = sp.hstack([X, sp.csr_matrix((X.shape[0], len(extra_genes)), dtype=np.float32)])
        X = X.tocsr()
    conditions = adata.obs["condition"].astype(str).to_numpy()
    split = (
        adata.obs["split"].astype(str).to_numpy()
        if "split" in adata.obs.columns
        else np.full(adata.n_obs, "train", dtype=object)
    )
    all_genes = [*genes, *extra_genes]
    col = {g: i for i, g in enumerate(all_genes)}
    cols_of: dict[str, np.ndarray | None] = {}
    for cond in pd.unique(conditions):
        gs = parse_condition(str(cond))
        cols = [col.get(g) for g in gs]
        cols_of[str(cond)] = (
            None if any(c is None for c in cols) else np.asarray(cols, dtype=np.int64)
        )
    return PerturbationData(
        adata=adata,
        X=X,
        genes=np.asarray(all_genes, dtype=object),
        conditions=conditions,
        split=split,
        keys=stable_cell_keys(adata.obs_names),
        cols_of=cols_of,
        n_measured=len(genes),
    )


def _read_prepared(data: AnnData | str | os.PathLike[str]) -> tuple[AnnData, str]:
    from celltune.data.gears import load_prepared

    if isinstance(data, (str, os.PathLike)):
        return load_prepared(data), str(Path(data).resolve())
    return data, "<in-memory AnnData>"


# ------------------------------------------------------------------ model helpers


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(
        batch["gene_ids"],
        batch["values"],
        pert_flags=batch["pert_flags"],
        padding_mask=batch["padding_mask"],
    )
    pred = out["mlm_output"]
    return pred.squeeze(-1) if pred.dim() == 3 else pred


def _build_model(
    cfg: PerturbConfig, genes: Sequence[str], pretrained: str | None
) -> tuple[torch.nn.Module, Any, np.ndarray, dict[str, Any]]:
    """Model, vocabulary, vocab id per gene, and a load report (for run.json)."""
    from celltune.data.vocab import GeneVocab
    from celltune.model.config import ModelConfig
    from celltune.model.model import CellTransformer

    info: dict[str, Any] = {}
    common = {"generator": True, "pert_pad_id": 2, "do_mvc": False, "explicit_zero_prob": False}
    if pretrained:
        from celltune.model.checkpoint import load_weights, read_state_dict

        pdir = Path(pretrained)
        if not (pdir / "vocab.json").is_file() or not (pdir / "args.json").is_file():
            raise InputError(
                f"--pretrained {pdir} is not a scGPT model directory (needs args.json, "
                "vocab.json and best_model.pt); download e.g. scGPT_human and pass its folder"
            )
        vocab = GeneVocab.from_file(pdir / "vocab.json")
        args = json.loads((pdir / "args.json").read_text())
        weights = next(
            (pdir / n for n in ("model.safetensors", "best_model.pt") if (pdir / n).is_file()), None
        )
        if weights is None:
            raise InputError(f"--pretrained {pdir} has no best_model.pt or model.safetensors")
        state = read_state_dict(weights)
        base = ModelConfig.from_args(args, state, vocab=vocab.token_to_id)
        mcfg = dataclasses.replace(
            base,
            **common,
            decoder=cfg.model.decoder,
            dropout=cfg.model.dropout,
            do_dab=False,
            use_batch_labels=False,
            domain_spec_batchnorm=False,
            num_batch_labels=0,
            input_emb_style="continuous",
        )
        model = CellTransformer(mcfg, vocab=vocab)
        report = load_weights(model, state, prefixes=list(PRETRAINED_PREFIXES))
        info["pretrained"] = str(pdir.resolve())
        info["pretrained_loaded"] = len(getattr(report, "loaded", []))
        logger.info(
            "loaded %d pretrained tensors (%s) from %s",
            info["pretrained_loaded"],
            ", ".join(PRETRAINED_PREFIXES),
            pdir,
        )
    else:
        vocab = GeneVocab.from_genes(list(genes))
        mcfg = ModelConfig(
            ntoken=len(vocab),
            pad_id=vocab.pad_id,
            d_model=cfg.model.d_model,
            nhead=cfg.model.nhead,
            d_hid=cfg.model.d_hid,
            nlayers=cfg.model.nlayers,
            dropout=cfg.model.dropout,
            pre_norm=cfg.model.pre_norm,
            decoder=cfg.model.decoder,
            input_emb_style="continuous",
            pad_value=0.0,
            **common,
        )
        model = CellTransformer(mcfg, vocab=vocab)
    match = vocab.match_genes(list(genes))
    info["genes_in_vocab"] = int(match.n_matched)
    return model, vocab, np.asarray(match.ids, dtype=np.int64), info


class _EpochShuffle(torch.utils.data.Sampler[list[int]]):
    """Seeded per-epoch shuffled mini-batches: an uninterrupted and a resumed run see the
    same order, and ``set_epoch`` re-draws the control partners and gene subsets too."""

    def __init__(self, n: int, batch_size: int, seed: int, followers: Sequence[Any]) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.followers = list(followers)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for f in self.followers:
            f.set_epoch(epoch)

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        for i in range(0, self.n, self.batch_size):
            yield order[i : i + self.batch_size].tolist()


# ------------------------------------------------------------------ prediction core


def _dense_rows(X: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    return np.asarray(X[rows].toarray(), dtype=np.float32)


@torch.no_grad()
def predict_cells(
    model: torch.nn.Module,
    controls: np.ndarray,
    gene_ids: np.ndarray,
    pert_cols: np.ndarray,
    *,
    max_seq_len: int,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    n_measured: int | None = None,
    include_zero_gene: str = "all",
) -> np.ndarray:
    """Predicted expression (n_controls, n_measured) for one perturbation, clipped at 0.

    Each control cell is run with flags on ``pert_cols``; gene lists longer than
    ``max_seq_len`` are covered in chunks that all carry the perturbed genes. Columns
    ``>= n_measured`` of ``gene_ids`` are token-only (unmeasured perturbed genes): they
    enter a sequence only when flagged and are not returned.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = model.config
    G = len(gene_ids)
    n_measured = G if n_measured is None else int(n_measured)
    controls = np.asarray(controls, dtype=np.float32)
    n = controls.shape[0]
    if controls.shape[1] < G:  # token-only columns carry value 0
        controls = np.hstack([controls, np.zeros((n, G - controls.shape[1]), np.float32)])
    cols_all = np.flatnonzero(gene_ids[:n_measured] >= 0)
    rng = np.random.default_rng(seed)
    # jobs: (control row, sequence columns). "all": every measured gene, chunked; "nonzero":
    # as in training, the genes expressed in that control (+ the flags); genes left out
    # keep their input value (0: not expressed in the control stays unexpressed).
    if include_zero_gene == "nonzero":
        jobs = [
            (i, chunk)
            for i in range(n)
            for chunk in inference_chunks(
                cols_all[controls[i, cols_all] != 0], pert_cols, max_seq_len, rng
            )
        ]
    else:
        chunks = inference_chunks(cols_all, pert_cols, max_seq_len, rng)
        jobs = [(i, chunk) for chunk in chunks for i in range(n)]
    out = controls.copy()
    was_training = model.training
    model.eval()
    ctx = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        for start in range(0, len(jobs), batch_size):
            part = jobs[start : start + batch_size]
            batch = build_batch(
                [controls[i] for i, _ in part],
                None,
                [c for _, c in part],
                [pert_cols] * len(part),
                gene_ids=gene_ids,
                pad_id=cfg.pad_id,
                pad_value=float(cfg.pad_value),
                pert_pad_id=cfg.pert_pad_id,
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            with ctx:
                pred = _forward(model, batch).float().clamp_min(0).cpu().numpy()
            for b, (i, c) in enumerate(part):
                out[i, c] = pred[b, : len(c)]
    finally:
        model.train(was_training)
    return out[:, :n_measured]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; NaN (constant input) counts as 0, as in GEARS."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    r = float(np.corrcoef(a, b)[0, 1])
    return r if np.isfinite(r) else 0.0


def _de_cols(adata: AnnData, cond: str, genes: np.ndarray) -> np.ndarray:
    """Columns of ``top_non_dropout_de_20`` of ``cond`` (GEARS de_idx), in model gene order."""
    de = adata.uns.get("top_non_dropout_de_20", {})
    names = adata.obs.loc[adata.obs["condition"].astype(str) == cond, "condition_name"]
    if names.empty:
        return np.array([], dtype=np.int64)
    ids = de.get(str(names.iloc[0]))
    if ids is None:
        return np.array([], dtype=np.int64)
    id_to_sym = dict(
        zip(adata.var_names.astype(str), adata.var["gene_name"].astype(str), strict=True)
    )
    pos = {g: i for i, g in enumerate(genes)}
    cols = [pos.get(id_to_sym.get(str(g), str(g))) for g in np.asarray(ids).astype(str)]
    return np.asarray([c for c in cols if c is not None], dtype=np.int64)


# ------------------------------------------------------------------ training


@dataclass
class PerturbationRun:
    """What :func:`train_perturbation_model` returns."""

    out_dir: Path
    model: torch.nn.Module
    history: Any
    info: dict[str, Any]


def _pick_rows(
    pdata: PerturbationData,
    split: str,
    cap: int | None,
    seed: int,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Target rows of one split with flag columns; unplaceable perturbations and the rows
    in ``exclude`` (held-out validation cells) left out, then ``cap`` cells per condition."""
    excluded = np.zeros(len(pdata.conditions), dtype=bool)
    if exclude is not None:
        excluded[exclude] = True
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    skipped: list[str] = []
    rng = np.random.default_rng([seed, 11])
    for cond in pd.unique(pdata.conditions[pdata.split == split]):
        cond = str(cond)
        if not pdata.placeable(cond):
            skipped.append(cond)
            continue
        r = np.flatnonzero((pdata.conditions == cond) & (pdata.split == split) & ~excluded)
        if cap is not None and len(r) > cap:
            r = np.sort(rng.choice(r, cap, replace=False))
        rows.append(r)
        c = np.array([], dtype=np.int64) if cond == CTRL else pdata.cols_of[cond]
        cols.extend([c] * len(r))  # type: ignore[list-item]
    all_rows = np.concatenate(rows) if rows else np.array([], dtype=np.int64)
    return all_rows, cols, skipped


def train_perturbation_model(
    data: AnnData | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: PerturbConfig | None = None,
    *,
    resume: bool = False,
    quiet: bool | None = None,
) -> PerturbationRun:
    """Fine-tune the perturbation-flag transformer on a prepared file (see module doc)."""
    from celltune.model.checkpoint import save_model
    from celltune.tasks.config import dump_config
    from celltune.train import distributed as dist_utils
    from celltune.train.loop import Trainer

    if dist_utils.launched_by_torchrun():
        # Its loaders and files are not rank-aware yet: refuse rather than train N copies.
        raise InputError(
            "perturb train runs in a single process; multi-process (torchrun / --devices) "
            "training is implemented for `celltune integrate` only. Run it without torchrun"
        )
    cfg = config or PerturbConfig()
    if quiet is not None:
        cfg = dataclasses.replace(cfg, train=cfg.train.replace(quiet=quiet))
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and (out / "checkpoint.pt").is_file() and not resume:
        raise InputError(
            f"{out} already holds a training run (checkpoint.pt); pass --resume to continue it "
            "or choose another --out"
        )
    t_start = time.perf_counter()
    adata, source = _read_prepared(data)
    check_prepared(adata, source)
    torch.manual_seed(cfg.train.seed)

    from celltune.data.gears import gene_symbols, parse_condition

    genes_all = list(gene_symbols(adata))
    if len(set(genes_all)) != len(genes_all):
        dup = pd.Index(genes_all)[pd.Index(genes_all).duplicated()].unique().tolist()
        raise InputError(
            f"duplicate gene symbols in var['gene_name']: {dup[:5]}; make them unique "
            "(adata.var_names_make_unique on symbols) and prepare again"
        )
    measured_set = set(genes_all)
    perturbed = sorted(
        {g for c in pd.unique(adata.obs["condition"].astype(str)) for g in parse_condition(c)}
    )
    unmeasured = [g for g in perturbed if g not in measured_set]
    extra_all = unmeasured if cfg.data.unmeasured_targets == "token" else []
    model, vocab, ids_all, info = _build_model(cfg, genes_all + extra_all, cfg.model.pretrained)
    ids_measured, ids_extra = ids_all[: len(genes_all)], ids_all[len(genes_all) :]
    keep = ids_measured >= 0
    if not keep.any():
        raise InputError(
            "none of the data's genes are in the pretrained vocabulary; check that "
            "var['gene_name'] holds gene symbols"
        )
    genes = [g for g, k in zip(genes_all, keep, strict=True) if k]
    extra = [g for g, i in zip(extra_all, ids_extra, strict=True) if i >= 0]
    gene_ids = np.concatenate([ids_measured[keep], ids_extra[ids_extra >= 0]])
    pdata = resolve_data(adata, genes, source, extra_genes=extra)
    if extra:
        logger.info(
            "%d perturbed gene(s) are not measured; they enter the model as an extra flagged "
            "token (value 0, not scored): %s",
            len(extra),
            ", ".join(extra[:16]) + (" ..." if len(extra) > 16 else ""),
        )

    # -- which perturbations the model can learn / be judged on
    all_perts = pdata.perturbations()
    unplaceable = [c for c in all_perts if not pdata.placeable(c)]
    if unplaceable:
        logger.warning(
            "%d/%d perturbations have a gene outside the model's gene list and are left out of "
            "model training/evaluation (baselines still cover them): %s",
            len(unplaceable),
            len(all_perts),
            ", ".join(unplaceable[:12]) + (" ..." if len(unplaceable) > 12 else ""),
        )
    n_train_perts = sum(1 for c in pdata.perturbations("train") if pdata.placeable(c))
    if n_train_perts == 0:
        raise InputError(
            "no training perturbation has its gene in the gene list, so the model can never "
            "see a flag; check var['gene_name'] against obs['condition']"
        )
    control_train = np.flatnonzero((pdata.conditions == CTRL) & (pdata.split == "train"))

    # -- validation perturbations (fallback: held-out cells of training perturbations). Only
    # perturbations of measured genes validate: an unmeasured gene never seen in training
    # has an untrained embedding, so its score says nothing about the model.
    val_perts = [c for c in pdata.perturbations("val") if pdata.measured(c)]
    val_cells: dict[str, np.ndarray] = {}
    if val_perts:
        validation = "val split"
        for c in val_perts:
            val_cells[c] = np.flatnonzero((pdata.conditions == c) & (pdata.split == "val"))
    else:
        # Validation must mirror the test (perturbations the model never saw), so hold out
        # whole training perturbations of measured genes when there are enough of them;
        # held-out cells of seen perturbations only measure memorisation.
        rng = np.random.default_rng([cfg.train.seed, 13])
        measured_train = [c for c in pdata.perturbations("train") if pdata.measured(c)]
        if len(measured_train) >= 3:
            k = max(1, round(0.2 * len(measured_train)))
            for c in sorted(rng.choice(measured_train, k, replace=False).tolist()):
                val_cells[c] = np.flatnonzero((pdata.conditions == c) & (pdata.split == "train"))
            validation = (
                f"{k} training perturbation(s) of measured genes held out whole "
                f"({', '.join(val_cells)}); the val split has none"
            )
            logger.warning("validation: %s", validation)
        else:
            validation = "held-out 10% of the cells of each training perturbation"
            logger.warning(
                "the val split has no perturbation of a measured gene and the training split "
                "too few to hold one out; validating on held-out cells (10%) of the training "
                "perturbations (seen perturbations: a weaker model-selection signal)"
            )
            for c in pdata.perturbations("train"):
                if not pdata.placeable(c):
                    continue
                idx = np.flatnonzero((pdata.conditions == c) & (pdata.split == "train"))
                if len(idx) < 2:
                    continue
                val_cells[c] = np.sort(rng.choice(idx, max(1, len(idx) // 10), replace=False))
    if not val_cells:  # no measured perturbed gene anywhere (Norman subset): token flags
        for c in pdata.perturbations("val"):
            if pdata.placeable(c):
                val_cells[c] = np.flatnonzero((pdata.conditions == c) & (pdata.split == "val"))
        validation = "val split, perturbations of unmeasured genes only (token flags)"
    held_out = np.concatenate(list(val_cells.values())) if val_cells else None
    cap = cfg.data.max_cells_per_condition
    train_rows, train_cols, _ = _pick_rows(
        pdata, "train", cap, cfg.train.seed, exclude=None if val_perts else held_out
    )
    if len(train_rows) == 0:
        raise InputError(
            "no training cells are left after holding out validation cells; add cells or "
            "perturbations to the training split"
        )

    rng_pool = np.random.default_rng([cfg.train.seed, 17])
    n_eval = min(cfg.data.n_eval_ctrl, len(control_train))
    eval_ctrl_rows = np.sort(rng_pool.choice(control_train, n_eval, replace=False))
    eval_controls = _dense_rows(pdata.X, eval_ctrl_rows)
    nm = pdata.n_measured
    ctrl_mean = np.asarray(pdata.X[pdata.control_rows].mean(axis=0)).ravel()[:nm]
    val_truth = {c: np.asarray(pdata.X[r].mean(axis=0)).ravel()[:nm] for c, r in val_cells.items()}
    val_de = {c: _de_cols(adata, c, pdata.genes) for c in val_cells}

    dataset = PerturbationPairs(
        pdata.X,
        target_idx=train_rows,
        pert_cols=train_cols,
        control_idx=control_train,
        keys=pdata.keys,
        seed=cfg.train.seed,
    )
    collator = PerturbationCollator(
        gene_ids=gene_ids,
        pad_id=model.config.pad_id,
        pad_value=float(model.config.pad_value),
        pert_pad_id=model.config.pert_pad_id,
        include_zero_gene=cfg.data.include_zero_gene,  # type: ignore[arg-type]
        max_seq_len=cfg.data.max_seq_len,
        seed=cfg.train.seed,
        n_measured=nm,
    )
    sampler = _EpochShuffle(len(dataset), cfg.train.batch_size, cfg.train.seed, [dataset, collator])
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collator, num_workers=cfg.train.num_workers
    )
    n_train_perts = len({c for c in pd.unique(pdata.conditions[train_rows]) if c != CTRL})
    logger.info(
        "training on %d cells (%d perturbations with a flaggable gene + %d control cells), "
        "%d genes; validation: %s (%d perturbations)",
        len(dataset),
        n_train_perts,
        int((pdata.conditions[train_rows] == CTRL).sum()),
        len(genes),
        validation,
        len(val_cells),
    )

    from celltune.losses import PerturbationObjective

    objective = PerturbationObjective()

    def step_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: Any) -> tuple[Any, Any]:
        """SPEC §6 loss: MSE over every non-padding position of the perturbed cell (token-only
        positions of unmeasured genes excluded: their expression is unknown)."""
        out = {"mlm_output": _forward(m, batch).float()}
        return objective(out, batch, mask=batch["target_mask"])

    def eval_fn(m: torch.nn.Module, ctx: Any) -> dict[str, float]:
        return _validation_metrics(
            m,
            eval_controls,
            gene_ids,
            {c: pdata.cols_of[c] for c in val_cells},  # type: ignore[misc]
            val_truth,
            val_de,
            ctrl_mean,
            max_seq_len=cfg.data.max_seq_len,
            batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
            seed=cfg.train.seed,
            amp_dtype=ctx.amp_dtype,
            n_measured=nm,
            include_zero_gene=cfg.data.include_zero_gene,
        )

    trainer = Trainer(model, cfg.train, step_fn=step_fn, eval_fn=eval_fn, out_dir=out)
    dump_config(cfg, out / "config.yaml", header="celltune perturb train: resolved configuration")
    t_fit = time.perf_counter()
    history = trainer.fit(loader, resume=resume)
    fit_s = time.perf_counter() - t_fit
    model = trainer.best_model()
    save_model(model, out / "model", vocab)

    # control pool for `predict` (same gene order as the model's gene list)
    pool_n = min(cfg.data.control_pool, len(control_train))
    pool_rows = np.sort(
        np.random.default_rng([cfg.train.seed, 19]).choice(control_train, pool_n, replace=False)
    )
    _write_controls(adata, pdata, pool_rows, out / "controls.h5ad")

    info.update(
        {
            "data": source,
            "n_genes": len(genes),
            "token_genes": extra,
            "train_flagged_genes": sorted(
                {g for c in pd.unique(pdata.conditions[train_rows]) for g in parse_condition(c)}
            ),
            "unmeasured_targets": cfg.data.unmeasured_targets,
            "n_train_perturbations_measured": sum(
                1 for c in pdata.perturbations("train") if pdata.measured(c)
            ),
            "genes_dropped_not_in_vocab": int((~keep).sum()),
            "n_perturbations": len(all_perts),
            "unplaceable_perturbations": unplaceable,
            "n_unplaceable": len(unplaceable),
            "n_train_cells": len(dataset),
            "n_train_perturbations": n_train_perts,
            "validation": validation,
            "val_perturbations": sorted(val_cells),
            "best_epoch": history.best_epoch,
            "best_val_pearson_delta": history.best_metric,
            "epochs_run": len(history),
            "stopped_early": history.stopped_early,
            # summed over epochs, so a resumed run reports its whole training time
            "fit_seconds": round(sum(float(r.get("time_s") or 0) for r in history.records), 1),
            "fit_seconds_this_call": round(fit_s, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "device": str(trainer.device),
            "amp": trainer.amp,
            "torch_threads": torch.get_num_threads(),
        }
    )
    write_json_atomic(out / "run.json", info)
    logger.info(
        "trained in %.1f s; best %s %.4f at epoch %s; model in %s",
        fit_s,
        SELECT_METRIC,
        history.best_metric if history.best_metric is not None else float("nan"),
        history.best_epoch,
        out / "model",
    )
    return PerturbationRun(out_dir=out, model=model, history=history, info=info)


def _validation_metrics(
    model: torch.nn.Module,
    controls: np.ndarray,
    gene_ids: np.ndarray,
    cols_of: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    de: dict[str, np.ndarray],
    ctrl_mean: np.ndarray,
    *,
    max_seq_len: int,
    batch_size: int,
    seed: int,
    amp_dtype: torch.dtype | None,
    n_measured: int | None = None,
    include_zero_gene: str = "all",
) -> dict[str, float]:
    """Mean over validation perturbations of pearson(_delta), DE pearson_delta and MSE."""
    rows: list[dict[str, float]] = []
    for cond, cols in cols_of.items():
        pred = predict_cells(
            model,
            controls,
            gene_ids,
            cols,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            seed=seed,
            amp_dtype=amp_dtype,
            n_measured=n_measured,
            include_zero_gene=include_zero_gene,
        ).mean(axis=0)
        t = truth[cond]
        d = de[cond]
        rows.append(
            {
                "val/pearson": _pearson(pred, t),
                "val/pearson_delta": _pearson(pred - ctrl_mean, t - ctrl_mean),
                "val/pearson_de_delta": _pearson(pred[d] - ctrl_mean[d], t[d] - ctrl_mean[d])
                if len(d) > 1
                else 0.0,
                "val/mse": float(np.mean((pred - t) ** 2)),
            }
        )
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _write_controls(adata: AnnData, pdata: PerturbationData, rows: np.ndarray, path: Path) -> None:
    """The control cells ``predict`` averages over, on the model's measured genes, in order."""
    import anndata as ad

    nm = pdata.n_measured
    genes = pdata.genes[:nm].astype(str)
    obs = pd.DataFrame(index=adata.obs_names[rows].astype(str))
    obs["condition"] = CTRL
    var = pd.DataFrame({"gene_name": genes}, index=pd.Index(genes))
    sub = ad.AnnData(X=pdata.X[rows][:, :nm].copy(), obs=obs, var=var)
    with atomic_path(path) as tmp:
        sub.write_h5ad(tmp)


# ------------------------------------------------------------------ loading a run


@dataclass
class LoadedRun:
    """A trained run directory, ready to predict."""

    out_dir: Path
    model: torch.nn.Module
    config: PerturbConfig
    info: dict[str, Any]
    genes: np.ndarray
    gene_ids: np.ndarray
    controls: np.ndarray

    @property
    def trained_genes(self) -> set[str]:
        """Genes whose flag the model saw in training (measured or as an extra token)."""
        return set(self.info.get("train_flagged_genes", []))

    def flag_inputs(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(gene_ids, pert_cols)`` for flagging ``genes``: measured genes are flagged at
        their input position; a gene of the vocabulary that is not measured becomes an
        extra token (value 0). Genes outside the vocabulary are rejected by name."""
        pos = {g: i for i, g in enumerate(self.genes)}
        vocab = self.model.vocab
        unknown = [g for g in genes if g not in pos and g not in vocab]
        if unknown:
            raise InputError(
                f"gene(s) not in the model's gene list: {', '.join(unknown)}. The model can "
                f"flag the {len(self.genes)} measured genes of {self.out_dir / 'controls.h5ad'} "
                "and genes of its vocabulary (model/vocab.json); check the spelling (gene "
                "symbols, case-sensitive)"
            )
        ids = list(self.gene_ids)
        cols = []
        for g in genes:
            if g in pos:
                cols.append(pos[g])
            else:
                cols.append(len(ids))
                ids.append(int(vocab[g]))
        untrained = [g for g in genes if g not in pos and g not in self.trained_genes]
        if untrained:
            logger.warning(
                "%s: not measured and never perturbed in training, so the model has only an "
                "untrained embedding for it; treat its prediction as a guess",
                ", ".join(untrained),
            )
        return np.asarray(ids, dtype=np.int64), np.asarray(cols, dtype=np.int64)


def load_run(run_dir: str | os.PathLike[str], device: str = "cpu") -> LoadedRun:
    """Open ``DIR`` written by :func:`train_perturbation_model`."""
    import anndata as ad

    from celltune.model.checkpoint import load_model

    d = Path(run_dir)
    need = [d / "model" / "args.json", d / "config.yaml", d / "controls.h5ad", d / "run.json"]
    missing = [str(p.relative_to(d)) for p in need if not p.exists()]
    if missing:
        raise InputError(
            f"{d} is not a finished 'celltune perturb train' run (missing {', '.join(missing)}); "
            "train first, or finish it with 'celltune perturb train ... --resume'"
        )
    cfg = load_perturb_config(d / "config.yaml")
    model = load_model(d / "model", device=device)
    if not model.config.generator:
        raise InputError(f"{d / 'model'} is not a perturbation model (no perturbation flags)")
    info = json.loads((d / "run.json").read_text())
    ctrl = ad.read_h5ad(d / "controls.h5ad")
    genes = ctrl.var["gene_name"].astype(str).to_numpy()
    vocab = model.vocab
    gene_ids = np.asarray([vocab[g] for g in genes], dtype=np.int64)
    X = ctrl.X.toarray() if sp.issparse(ctrl.X) else np.asarray(ctrl.X)
    return LoadedRun(
        out_dir=d,
        model=model,
        config=cfg,
        info=info,
        genes=genes,
        gene_ids=gene_ids,
        controls=np.asarray(X, dtype=np.float32),
    )


def _parse_request(text: str) -> tuple[str, tuple[str, ...]]:
    """``"FEV"``, ``"FEV+ctrl"``, ``"FEV+SAMD11"`` → GEARS condition and its genes."""
    parts = [p.strip() for p in str(text).split("+") if p.strip()]
    genes = tuple(p for p in parts if p != CTRL)
    if not genes or len(genes) > 2 or len(set(genes)) != len(genes):
        raise InputError(
            f"perturbation {text!r} is not a gene, 'GENE+ctrl' or 'GENEA+GENEB'; give one or "
            "two distinct gene symbols joined by '+'"
        )
    cond = f"{genes[0]}+{CTRL}" if len(genes) == 1 else f"{genes[0]}+{genes[1]}"
    return cond, genes


@dataclass
class Prediction:
    """Mean and per-cell spread of predicted expression per perturbation."""

    genes: np.ndarray
    mean: pd.DataFrame  # perturbations × genes
    std: pd.DataFrame
    control_mean: np.ndarray
    n_ctrl: int

    def to_long(self) -> pd.DataFrame:
        """Tidy table: perturbation, gene, mean, std, control_mean, delta."""
        frames = []
        for cond in self.mean.index:
            m = self.mean.loc[cond].to_numpy()
            frames.append(
                pd.DataFrame(
                    {
                        "perturbation": cond,
                        "gene": self.genes,
                        "mean": m,
                        "std": self.std.loc[cond].to_numpy(),
                        "control_mean": self.control_mean,
                        "delta": m - self.control_mean,
                        "n_ctrl": self.n_ctrl,
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


def predict_perturbations(
    run: LoadedRun | str | os.PathLike[str],
    perturbations: Sequence[str],
    *,
    n_ctrl: int = 300,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 64,
    quiet: bool = True,
) -> Prediction:
    """Predict single / combination perturbations, averaged over ``n_ctrl`` control cells.

    Genes outside the model's gene list are rejected by name before anything runs.
    """
    lr = run if isinstance(run, LoadedRun) else load_run(run, device=device)
    if not perturbations:
        raise InputError("no perturbations given; e.g. --perturbations FEV 'FEV+SAMD11'")
    if n_ctrl < 1:
        raise InputError(f"--n-ctrl must be >= 1, got {n_ctrl}")
    requests = [_parse_request(p) for p in perturbations]
    unknown = [
        g for _, gs in requests for g in gs if g not in set(lr.genes) and g not in lr.model.vocab
    ]
    if unknown:  # all unknown genes named at once, before anything runs
        lr.flag_inputs(unknown)
    flags = [lr.flag_inputs(g) for _, g in requests]
    n = min(n_ctrl, len(lr.controls))
    if n < n_ctrl:
        logger.warning("only %d control cells stored with the run; using all of them", n)
    pick = np.sort(np.random.default_rng([seed, 23]).choice(len(lr.controls), n, replace=False))
    controls = lr.controls[pick]
    means, stds = [], []
    for ids, cols in tqdm(flags, desc="predict", disable=quiet, leave=False):
        pred = predict_cells(
            lr.model,
            controls,
            ids,
            cols,
            max_seq_len=lr.config.data.max_seq_len,
            batch_size=batch_size,
            seed=seed,
            n_measured=len(lr.genes),
            include_zero_gene=lr.config.data.include_zero_gene,
        )
        means.append(pred.mean(axis=0))
        stds.append(pred.std(axis=0))
    index = pd.Index([c for c, _ in requests], name="perturbation")
    return Prediction(
        genes=lr.genes,
        mean=pd.DataFrame(np.vstack(means), index=index, columns=lr.genes),
        std=pd.DataFrame(np.vstack(stds), index=index, columns=lr.genes),
        control_mean=lr.controls.mean(axis=0),
        n_ctrl=n,
    )


def write_prediction_csv(pred: Prediction, path: str | os.PathLike[str]) -> Path:
    """Long-format CSV (atomic)."""
    with atomic_path(path) as tmp:
        pred.to_long().to_csv(tmp, index=False)
    return Path(path)


__all__ = [
    "LoadedRun",
    "PerturbConfig",
    "PerturbDataConfig",
    "PerturbModelConfig",
    "PerturbationRun",
    "Prediction",
    "check_prepared",
    "load_perturb_config",
    "load_run",
    "predict_cells",
    "predict_perturbations",
    "resolve_data",
    "train_perturbation_model",
    "write_prediction_csv",
]
