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

Beside it: ``context`` (StepContext, History), ``loader``, ``state`` (checkpoint), ``progress``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from celltune.errors import CelltuneError, InputError
from celltune.files import atomic_path
from celltune.train import distributed as dist_utils
from celltune.train.config import TrainConfig
from celltune.train.context import EvalFn, History, NonFiniteLossError, StepContext, StepFn
from celltune.train.loader import lookahead, make_loader, set_epoch, to_device
from celltune.train.progress import ETA_BATCHES, ETA_SKIP, epoch_line, fmt, log_eta, term_values
from celltune.train.schedule import epoch_scheduler, run_steps, set_step_lr
from celltune.train.state import (
    CHECKPOINT_FORMAT,
    check_resume_input,
    input_fingerprint,
    read_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
BEST_STATE_NAME = "best_state.pt"
HISTORY_NAME = "history.csv"


class Trainer:
    """The training loop; see the module docstring and ``docs/training.md``.

    ``step_fn(model, batch, ctx) -> (loss, terms)`` runs under autocast with ``batch``
    already on ``ctx.device``; ``loss`` must be a scalar *mean* over the mini-batch (gradient
    accumulation and DDP average it), ``terms`` maps names to scalars that are logged as
    ``train/<name>``. ``eval_fn(model, ctx) -> {"val/...": float}`` runs with the bare model in
    eval mode under ``no_grad`` on every rank; under DDP each rank may score its share
    (``ctx.rank`` of ``ctx.world_size``) and the Trainer averages the results over ranks.
    A custom ``optimizer`` replaces the default Adam (StepLR is still attached to it).
    """

    # long: device, AMP, optimizer, scheduler and DDP set up in the order they depend on
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
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = epoch_scheduler(
            self.optimizer, config
        )
        self.total_steps = 0  # optimizer steps of the whole run (cosine schedule), set by fit
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
            seed_everything(cfg.seed + self.rank)
        if self.history.stopped_early:
            logger.info("the checkpointed run already stopped early; nothing to do")
            return self.history
        if start_epoch >= cfg.epochs:
            logger.info("checkpoint has %d/%d epochs; nothing to do", start_epoch, cfg.epochs)
            return self.history

        self.total_steps = run_steps(train_loader, cfg)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            set_epoch(train_loader, epoch)
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

    # long: the hot loop (accumulation, DDP no_sync, AMP scaling) reads best as one pass
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
        t_eta = time.perf_counter()
        try:
            for index, batch, is_last in lookahead(loader, cap):
                sync = pending + 1 == accum or is_last
                batch = to_device(batch, self.device, non_blocking)
                ctx = self._context(epoch, index, training=True)
                no_sync = (
                    self.model.no_sync()
                    if not sync and hasattr(self.model, "no_sync")
                    else contextlib.nullcontext()
                )
                with no_sync:
                    with ctx.autocast():
                        loss, terms = self.step_fn(self.model, batch, ctx)
                    values = term_values(loss, terms)
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
                if index + 1 == ETA_SKIP:
                    t_eta = time.perf_counter()
                eta_now = index + 1 == ETA_SKIP + ETA_BATCHES and total and self.is_main
                if eta_now and not self._eta_done:
                    self._eta_done = True
                    log_eta(time.perf_counter() - t_eta, ETA_BATCHES, total, cfg.epochs - epoch)
                if not bar.disable:
                    bar.set_postfix({k: f"{sums[k] / counts[k]:.4g}" for k in sums}, refresh=False)
                if (index + 1) % cfg.log_every == 0 and not is_last:
                    means = {k: sums[k] / counts[k] for k in sums}
                    if cfg.quiet and self.is_main:
                        main = {k: v for k, v in means.items() if k in ("loss", "grad_norm")}
                        logger.info("epoch %d batch %d: %s", epoch + 1, index + 1, fmt(main))
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
        set_step_lr(self.optimizer, cfg, self.global_step, self.total_steps)
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
        line = epoch_line(record, self.select_metric, self.config.epochs)
        logger.info("%s%s", line, " (best)" if improved else "")

    # -- checkpoints --------------------------------------------------------------------
    def _save_checkpoint(self, epochs_done: int) -> None:
        rng = dist_utils.all_gather_object(rng_state())
        if not self.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
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
        state = read_checkpoint(path, self.select_metric, self.fingerprint)
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
            set_rng_state(rng[self.rank])
        else:
            logger.warning(
                "checkpoint was written by %d processes, this run has %d: random streams "
                "are re-seeded, so results will differ from an uninterrupted run",
                len(rng),
                self.world_size,
            )
            seed_everything(self.config.seed + self.rank + 1_000_003 * int(state["epoch"]))
        epoch = int(state["epoch"])
        if self.is_main:
            logger.info("resumed from %s after epoch %d", path, epoch)
        return epoch


__all__ = [
    "BEST_STATE_NAME",
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
    "EvalFn",
    "History",
    "NonFiniteLossError",
    "StepContext",
    "StepFn",
    "Trainer",
    "check_resume_input",
    "input_fingerprint",
    "make_loader",
]
