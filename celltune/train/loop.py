"""The one training loop of celltune: tasks configure it, they never copy it.

A task supplies ``step_fn(model, batch, ctx) -> (loss, terms)`` (which heads and losses)
and optionally ``eval_fn(model, ctx) -> {"val/...": float}``; :class:`Trainer` does the
rest the same way for every task: device placement, autocast (bf16 / fp16 + GradScaler),
gradient accumulation and clipping, Adam + StepLR per epoch, per-term running means in a
tqdm bar, ``history.csv``, best-model selection on a named metric, early stopping,
per-epoch resumable checkpoints, and DDP when launched under torchrun.

Files in ``out_dir`` (written by rank 0 only, atomically):
``history.csv`` (one row per epoch), ``best_state.pt`` (the best model's ``state_dict``)
and ``checkpoint.pt`` (everything needed to resume; loadable with ``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from celltune.errors import CelltuneError, InputError
from celltune.files import atomic_path, write_text_atomic
from celltune.train import distributed as dist_utils
from celltune.train.config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
BEST_STATE_NAME = "best_state.pt"
HISTORY_NAME = "history.csv"
_CHECKPOINT_FORMAT = "celltune.train.checkpoint/1"

StepFn = Callable[[nn.Module, Any, "StepContext"], "tuple[torch.Tensor, Mapping[str, Any]]"]
EvalFn = Callable[[nn.Module, "StepContext"], Mapping[str, float]]


#: Mini-batches timed before the run's training time is estimated.
ETA_BATCHES = 5


def _log_eta(elapsed: float, done: int, per_epoch: int, epochs_left: int) -> None:
    """Print the training time estimated from the first mini-batches (warn past 15 min),
    so a run that would take hours says so in its first minute, not at its end."""
    seconds = elapsed / done * per_epoch * epochs_left
    msg = (
        f"estimated training time: {seconds / 60:.1f} min ({per_epoch} mini-batches/epoch x "
        f"{epochs_left} epoch(s) at {elapsed / done:.2f} s each, validation not included)"
    )
    if seconds > 15 * 60:
        logger.warning("%s; for a quicker run lower --epochs or the model size", msg)
    else:
        logger.info(msg)


class NonFiniteLossError(CelltuneError, FloatingPointError):
    """The training loss became NaN or infinite (usually lr too high or fp16 overflow)."""


@dataclass
class StepContext:
    """What ``step_fn`` / ``eval_fn`` may need besides the model and the batch.

    ``module`` is the bare model (DDP / ``torch.compile`` unwrapped) for attribute access;
    ``step_fn`` must still call the ``model`` it is given so DDP can synchronise gradients.
    ``epoch`` is 0-based (the value passed to ``set_epoch``); ``step`` counts optimizer
    steps since the start of training; ``batch_index`` is the mini-batch within the epoch.
    """

    device: torch.device
    amp: str
    amp_dtype: torch.dtype | None
    epoch: int
    step: int
    batch_index: int
    training: bool
    world_size: int
    rank: int
    config: TrainConfig
    module: nn.Module
    out_dir: Path

    @property
    def is_main(self) -> bool:
        """Rank 0 (the process that logs and writes files)."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast as configured (the Trainer already wraps ``step_fn`` in it; ``eval_fn``
        decides itself, since metrics such as Pearson may want full precision)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


@dataclass
class History:
    """Per-epoch records (``epoch`` is 1-based; ``train/*``, ``val/*``, ``lr``, ``time_s``)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    select_metric: str = "val/loss"
    select_mode: str = "min"
    best_epoch: int | None = None
    best_metric: float | None = None
    stopped_early: bool = False

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> list[Any]:
        """One column, ``None`` where an epoch lacks the key."""
        return [r.get(key) for r in self.records]

    def keys(self) -> list[str]:
        """Column names in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    @property
    def last(self) -> dict[str, Any]:
        """The latest epoch's record (empty before the first epoch)."""
        return self.records[-1] if self.records else {}

    def to_csv_text(self) -> str:
        """CSV with one row per epoch; missing values are empty cells."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.keys(), lineterminator="\n")
        writer.writeheader()
        for record in self.records:
            writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
        return buf.getvalue()

    def to_csv(self, path: str | Path) -> None:
        """Write :meth:`to_csv_text` atomically."""
        write_text_atomic(path, self.to_csv_text())


class Trainer:
    """The training loop; see the module docstring and ``docs/readme_parts/train.md``.

    ``step_fn(model, batch, ctx) -> (loss, terms)`` runs under autocast with ``batch``
    already on ``ctx.device``; ``loss`` must be a scalar *mean* over the mini-batch (gradient
    accumulation and DDP average it), ``terms`` maps names to scalars that are logged as
    ``train/<name>``. ``eval_fn(model, ctx) -> {"val/...": float}`` runs with the bare model in
    eval mode under ``no_grad`` on every rank; under DDP each rank may score its share
    (``ctx.rank`` of ``ctx.world_size``) and the Trainer averages the results over ranks.
    A custom ``optimizer`` replaces the default Adam (StepLR is still attached to it).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        *,
        step_fn: StepFn,
        eval_fn: EvalFn | None = None,
        out_dir: str | Path,
        optimizer: torch.optim.Optimizer | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        # What the run trains on (input shape, name hashes, vocabulary): stored in the
        # checkpoint and compared on resume, so a resume on other data is refused.
        self.fingerprint = dict(fingerprint or {})
        self.config = config
        self.step_fn = step_fn
        self.eval_fn = eval_fn
        self.out_dir = Path(out_dir)

        dist_utils.init_distributed()
        self.world_size = dist_utils.world_size()
        self.rank = dist_utils.rank()
        self.is_main = self.rank == 0
        self.device = config.resolve_device(dist_utils.local_rank())
        self.amp = config.resolve_amp(self.device)
        self.amp_dtype: torch.dtype | None = {
            "off": None,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
        }[self.amp]
        self.select_metric = config.select_metric or (
            "val/loss" if eval_fn is not None else "train/loss"
        )
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

        self.module = model.to(self.device)
        self.optimizer = optimizer or torch.optim.Adam(
            [p for p in self.module.parameters() if p.requires_grad],
            lr=config.lr,
            eps=config.resolve_adam_eps(self.amp),
            weight_decay=config.weight_decay,
            # The fused kernel is ~6x cheaper per step than the default per-parameter loop
            # on CPU (measured), a large fixed cost at the small batch sizes used on laptops.
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = (
            torch.optim.lr_scheduler.StepLR(
                self.optimizer, step_size=config.step_size, gamma=config.gamma
            )
            if config.scheduler == "step"
            else None
        )
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None
        )

        train_model: nn.Module = self.module
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )
        if config.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]
        self.model = train_model

        self.history = History(select_metric=self.select_metric, select_mode=config.select_mode)
        self.global_step = 0
        self._bad_epochs = 0
        logger.info(
            "trainer: device %s, amp %s, world size %d, select %s (%s)",
            self.device,
            self.amp,
            self.world_size,
            self.select_metric,
            config.select_mode,
        )

    # -- public API ---------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def best_state_path(self) -> Path:
        return self.out_dir / BEST_STATE_NAME

    @property
    def history_path(self) -> Path:
        return self.out_dir / HISTORY_NAME

    def fit(self, train_loader: Iterable[Any], *, resume: bool = False) -> History:
        """Train for ``config.epochs`` epochs (or until early stopping).

        With ``resume=True`` and a ``checkpoint.pt`` in ``out_dir``, training continues from
        the last completed epoch with the optimizer, scheduler, scaler, history, best metric
        and RNG states restored, so the final weights equal those of an uninterrupted run.
        Without a checkpoint, ``resume=True`` starts from scratch (logged).
        """
        cfg = self.config
        start_epoch = 0
        if resume and self.checkpoint_path.is_file():
            start_epoch = self._load_checkpoint()
        else:
            if resume:
                logger.info("no checkpoint in %s: starting from scratch", self.out_dir)
            _seed_everything(cfg.seed + self.rank)
        if self.history.stopped_early:
            logger.info("the checkpointed run already stopped early; nothing to do")
            return self.history
        if start_epoch >= cfg.epochs:
            logger.info("checkpoint has %d/%d epochs; nothing to do", start_epoch, cfg.epochs)
            return self.history

        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            _set_epoch(train_loader, epoch)
            lr = float(self.optimizer.param_groups[0]["lr"])
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
            record.update(self._train_epoch(train_loader, epoch))
            if self.eval_fn is not None:
                record.update(self._evaluate(epoch))
            if self.scheduler is not None:
                self.scheduler.step()
            record["time_s"] = round(time.perf_counter() - t0, 3)
            self.history.records.append(record)
            improved = self._update_best(record)
            stop = cfg.patience is not None and self._bad_epochs >= cfg.patience
            self.history.stopped_early = stop
            self._log_epoch(record, improved)
            if self.is_main:
                self.history.to_csv(self.history_path)
            last = epoch + 1 == cfg.epochs
            if stop or last or (epoch + 1) % cfg.checkpoint_every == 0:
                self._save_checkpoint(epoch + 1)
            if stop:
                self._log_early_stop(epoch + 1)
                break
        dist_utils.barrier()
        return self.history

    def _log_early_stop(self, epoch: int) -> None:
        if self.is_main:
            logger.info(
                "early stopping after epoch %d: %s has not improved for %d epochs "
                "(best %s at epoch %s)",
                epoch,
                self.select_metric,
                self._bad_epochs,
                self.history.best_metric,
                self.history.best_epoch,
            )

    def best_model(self) -> nn.Module:
        """Load the best weights (by ``select_metric``) into the model and return it."""
        if not self.best_state_path.is_file():
            raise CelltuneError(
                f"no best model in {self.out_dir}: {BEST_STATE_NAME} does not exist; "
                "run fit() first (or point out_dir at a finished run)"
            )
        state = torch.load(self.best_state_path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state)
        return self.module

    def evaluate(self, epoch: int | None = None) -> dict[str, float]:
        """Run ``eval_fn`` once (averaged over ranks); empty without an ``eval_fn``."""
        if self.eval_fn is None:
            return {}
        return self._evaluate(len(self.history) if epoch is None else epoch)

    # -- one epoch ----------------------------------------------------------------------
    def _context(self, epoch: int, batch_index: int, training: bool) -> StepContext:
        return StepContext(
            device=self.device,
            amp=self.amp,
            amp_dtype=self.amp_dtype,
            epoch=epoch,
            step=self.global_step,
            batch_index=batch_index,
            training=training,
            world_size=self.world_size,
            rank=self.rank,
            config=self.config,
            module=self.module,
            out_dir=self.out_dir,
        )

    _eta_done = False  # the time estimate is printed once per Trainer

    def _train_epoch(self, loader: Iterable[Any], epoch: int) -> dict[str, float]:
        cfg = self.config
        accum = cfg.grad_accum
        cap = cfg.max_steps_per_epoch * accum if cfg.max_steps_per_epoch else None
        total: int | None
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if cap is not None and total is not None:
            total = min(total, cap)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        non_blocking = cfg.resolve_pin_memory(self.device)

        self.module.train()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        pending = 0  # micro-batches accumulated since the last optimizer step
        bar = tqdm(
            total=total,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=cfg.quiet or not self.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        t_epoch = time.perf_counter()
        try:
            for index, batch, is_last in _lookahead(loader, cap):
                sync = pending + 1 == accum or is_last
                batch = _to_device(batch, self.device, non_blocking)
                ctx = self._context(epoch, index, training=True)
                no_sync = (
                    self.model.no_sync()
                    if not sync and hasattr(self.model, "no_sync")
                    else contextlib.nullcontext()
                )
                with no_sync:
                    with ctx.autocast():
                        loss, terms = self.step_fn(self.model, batch, ctx)
                    values = _term_values(loss, terms)
                    if not math.isfinite(values["loss"]):
                        raise NonFiniteLossError(
                            f"non-finite training loss at epoch {epoch + 1}, mini-batch "
                            f"{index + 1} (optimizer step {self.global_step}): "
                            + ", ".join(f"{k}={v:.6g}" for k, v in values.items())
                            + "; lower the learning rate (lr), enable gradient clipping, "
                            "or switch amp from 'fp16' to 'bf16'/'off'"
                        )
                    scaled = loss / accum
                    if self.scaler is not None:
                        self.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                pending += 1
                if sync:
                    grad_norm = self._optimizer_step(params, pending)
                    pending = 0
                    if grad_norm is not None and math.isfinite(grad_norm):
                        values["grad_norm"] = grad_norm
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                bar.update(1)
                if index + 1 == ETA_BATCHES and total and self.is_main and not self._eta_done:
                    self._eta_done = True
                    _log_eta(time.perf_counter() - t_epoch, index + 1, total, cfg.epochs - epoch)
                if not bar.disable:
                    bar.set_postfix({k: f"{sums[k] / counts[k]:.4g}" for k in sums}, refresh=False)
                if (index + 1) % cfg.log_every == 0 and not is_last:
                    means = {k: sums[k] / counts[k] for k in sums}
                    if cfg.quiet and self.is_main:
                        logger.info("epoch %d batch %d: %s", epoch + 1, index + 1, _fmt(means))
        finally:
            bar.close()
        if not sums:
            raise InputError(
                f"the training loader yielded no mini-batches in epoch {epoch + 1}; "
                "check that the training set is not empty and batch_size/drop_last fit it"
            )
        means = {(k if k.startswith("train/") else f"train/{k}"): sums[k] / counts[k] for k in sums}
        return dist_utils.all_reduce_mean(means, self._reduce_device())

    def _optimizer_step(self, params: list[torch.Tensor], pending: int) -> float | None:
        """Step once on the accumulated gradients; returns the pre-clip gradient norm."""
        cfg = self.config
        if pending < cfg.grad_accum:
            # A short last group (end of epoch): every loss was divided by grad_accum, so
            # rescale to a mean over the micro-batches actually seen.
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(cfg.grad_accum / pending)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm: float | None = None
        if cfg.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return grad_norm

    def _evaluate(self, epoch: int) -> dict[str, float]:
        assert self.eval_fn is not None
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                metrics = self.eval_fn(self.module, self._context(epoch, 0, training=False))
        finally:
            self.module.train(was_training)
        values = {k: float(v) for k, v in metrics.items()}
        return dist_utils.all_reduce_mean(values, self._reduce_device())

    def _reduce_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    # -- selection, logging -------------------------------------------------------------
    def _update_best(self, record: Mapping[str, Any]) -> bool:
        name = self.select_metric
        if name not in record:
            available = sorted(k for k in record if k not in ("epoch", "time_s"))
            raise InputError(
                f"select_metric {name!r} is not among the metrics of epoch "
                f"{record['epoch']} ({available}); set TrainConfig.select_metric to one of them"
                + ("" if self.eval_fn is not None else " or pass an eval_fn")
            )
        value = float(record[name])
        best = self.history.best_metric
        if math.isfinite(value) and (
            best is None or (value < best if self.config.select_mode == "min" else value > best)
        ):
            self.history.best_metric = value
            self.history.best_epoch = int(record["epoch"])
            self._bad_epochs = 0
            if self.is_main:
                state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
                with atomic_path(self.best_state_path) as tmp:
                    torch.save(state, tmp)
            return True
        self._bad_epochs += 1
        return False

    def _log_epoch(self, record: Mapping[str, Any], improved: bool) -> None:
        if not self.is_main:
            return
        shown = {k: v for k, v in record.items() if k not in ("epoch",)}
        logger.info(
            "epoch %d/%d: %s%s",
            record["epoch"],
            self.config.epochs,
            _fmt(shown),
            " (best)" if improved else "",
        )

    # -- checkpoints --------------------------------------------------------------------
    def _save_checkpoint(self, epochs_done: int) -> None:
        rng = dist_utils.all_gather_object(_rng_state())
        if not self.is_main:
            return
        state = {
            "format": _CHECKPOINT_FORMAT,
            "epoch": epochs_done,
            "global_step": self.global_step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "history": self.history.records,
            "best_metric": self.history.best_metric,
            "best_epoch": self.history.best_epoch,
            "bad_epochs": self._bad_epochs,
            "stopped_early": self.history.stopped_early,
            "select_metric": self.select_metric,
            "config": self.config.to_dict(),
            "world_size": self.world_size,
            "rng": rng,
            "fingerprint": self.fingerprint,
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self) -> int:
        path = self.checkpoint_path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt / foreign file: say which and what to do
            raise CelltuneError(
                f"cannot resume from {path}: {err}; delete it to start from scratch"
            ) from err
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
            raise CelltuneError(
                f"{path} is not a celltune training checkpoint; delete it or use another --out"
            )
        if state["select_metric"] != self.select_metric:
            raise InputError(
                f"the checkpoint selected models on {state['select_metric']!r} but this run "
                f"selects on {self.select_metric!r}; use the same select_metric to resume"
            )
        _check_fingerprint(state.get("fingerprint") or {}, self.fingerprint, path)
        changed = {
            k: (v, getattr(self.config, k, None))
            for k, v in state["config"].items()
            if k not in ("epochs", "quiet", "log_every", "num_workers", "checkpoint_every")
            and getattr(self.config, k, None) != v
        }
        if changed:
            logger.warning("resuming with changed settings (checkpoint → now): %s", changed)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        self.history.records = list(state["history"])
        self.history.best_metric = state["best_metric"]
        self.history.best_epoch = state["best_epoch"]
        self.history.stopped_early = bool(state["stopped_early"])
        self._bad_epochs = int(state["bad_epochs"])
        rng = state["rng"]
        if len(rng) == self.world_size:
            _set_rng_state(rng[self.rank])
        else:
            logger.warning(
                "checkpoint was written by %d processes, this run has %d: random streams "
                "are re-seeded, so results will differ from an uninterrupted run",
                len(rng),
                self.world_size,
            )
            _seed_everything(self.config.seed + self.rank + 1_000_003 * int(state["epoch"]))
        epoch = int(state["epoch"])
        if self.is_main:
            logger.info("resumed from %s after epoch %d", path, epoch)
        return epoch


# -- helpers (module-private) ------------------------------------------------------------
def _check_fingerprint(saved: Mapping[str, Any], now: Mapping[str, Any], path: Path) -> None:
    """Refuse a resume whose input or vocabulary differs from the checkpointed run's."""
    differ = [k for k in sorted(set(saved) & set(now)) if saved[k] != now[k]]
    if differ:
        detail = "; ".join(f"{k}: {saved[k]} → {now[k]}" for k in differ)
        raise InputError(
            f"cannot resume from {path}: the input differs from the checkpointed run's "
            f"({detail}); resume with the original input file, or start a new run in "
            "another --out directory"
        )


def input_fingerprint(adata: Any, vocab: Any = None) -> dict[str, Any]:
    """Shape, file, name hashes of an AnnData and a hash of the vocabulary, for resume checks."""
    import hashlib
    import os

    def digest(names: Iterable[Any]) -> str:
        h = hashlib.sha256()
        for n in names:
            h.update(str(n).encode("utf-8") + b"\0")
        return h.hexdigest()[:16]

    fp: dict[str, Any] = {
        "shape": [int(adata.n_obs), int(adata.n_vars)],
        "obs_names": digest(adata.obs_names),
        "var_names": digest(adata.var_names),
    }
    filename = getattr(adata, "filename", None)
    if filename:
        fp["file"] = str(os.path.abspath(filename))
        fp["file_size"] = os.path.getsize(filename)
    if vocab is not None:
        mapping = getattr(vocab, "token_to_id", vocab)
        mapping = mapping() if callable(mapping) else mapping
        fp["vocab"] = digest(f"{k}={v}" for k, v in sorted(dict(mapping).items()))
    return fp


def make_loader(
    dataset: torch.utils.data.Dataset[Any],
    config: TrainConfig,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    batch_sampler: Iterable[list[int]] | None = None,
    shuffle: bool = False,
    drop_last: bool = False,
    eval: bool = False,
    device: torch.device | None = None,
) -> torch.utils.data.DataLoader[Any]:
    """A DataLoader with the config's workers / pinned memory and DDP sharding.

    Workers are not persistent on purpose: the dataset and collate_fn are re-sent to them
    every epoch, so ``set_epoch`` (per-epoch masks) reaches the workers. Without a
    ``batch_sampler``, a ``DistributedSampler`` shards the data when running under DDP.
    """
    device = device or config.resolve_device(dist_utils.local_rank())
    common: dict[str, Any] = {
        "collate_fn": collate_fn,
        "num_workers": config.num_workers,
        "pin_memory": config.resolve_pin_memory(device),
    }
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **common)
    batch_size = (config.eval_batch_size or config.batch_size) if eval else config.batch_size
    sampler = None
    if dist_utils.world_size() > 1:
        sampler = torch.utils.data.DistributedSampler(
            dataset,
            num_replicas=dist_utils.world_size(),
            rank=dist_utils.rank(),
            shuffle=shuffle,
            seed=config.seed,
            drop_last=drop_last,
        )
        shuffle = False
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        **common,
    )


def _lookahead(loader: Iterable[Any], cap: int | None) -> Iterator[tuple[int, Any, bool]]:
    """Yield ``(index, batch, is_last)``: the loop must know the last mini-batch to step on a
    short final accumulation group (and to sync DDP gradients there), even when the loader
    has no ``len``. Stops after ``cap`` mini-batches without fetching another one."""
    end = object()
    it = iter(loader)
    nxt = next(it, end)
    index = 0
    while nxt is not end:
        batch = nxt
        nxt = end if cap is not None and index + 1 >= cap else next(it, end)
        yield index, batch, nxt is end
        index += 1


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell samplers, dataset and collate_fn the epoch (they redraw shuffles / masks)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = [
        loader,
        batch_sampler,
        getattr(batch_sampler, "sampler", None),  # torch BatchSampler wrapping a sampler
        getattr(loader, "sampler", None),
        getattr(loader, "dataset", None),
        getattr(loader, "collate_fn", None),
    ]
    seen: set[int] = set()
    for obj in candidates:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        setter = getattr(obj, "set_epoch", None)
        if callable(setter):
            setter(epoch)


def _to_device(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device, non_blocking) for v in batch)
    return batch


def _term_values(loss: torch.Tensor, terms: Mapping[str, Any]) -> dict[str, float]:
    """Scalars for logging: ``loss`` first, then the task's terms (tensors → floats)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            "step_fn must return (loss, terms) with loss a scalar tensor, got "
            + (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            + ("" if isinstance(loss, torch.Tensor) else type(loss).__name__)
        )
    values = {"loss": float(loss.detach())}
    for key, value in terms.items():
        if key in ("loss", "train/loss"):
            continue
        values[key] = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    return values


def _fmt(values: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """RNG states in a form ``torch.load(weights_only=True)`` accepts (no numpy arrays)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` needs tuples; a round trip may have turned them into lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
