"""Learning-rate schedules of the training loop.

``step`` is scGPT's StepLR (``gamma`` every ``step_size`` epochs). ``cosine`` is a linear
warm-up over ``warmup_steps`` optimizer steps followed by a cosine decay to
``min_lr_ratio · lr`` at the run's last step: the usual schedule for training a
transformer from scratch, where a large lr in the first steps of a post-norm model
diverges and a fixed per-epoch decay depends on how many cells an epoch holds. The cosine
lr is a pure function of the global step, so ``--resume`` needs no scheduler state.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def epoch_scheduler(optimizer: torch.optim.Optimizer, config: Any) -> Any:
    """The per-epoch scheduler (StepLR for ``scheduler="step"``), else None."""
    if config.scheduler != "step":
        return None
    return torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.step_size, gamma=config.gamma
    )


def cosine_lr(
    step: int, base_lr: float, total_steps: int, warmup_steps: int, min_ratio: float
) -> float:
    """lr of optimizer step ``step`` (0-based) under warm-up + cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    if total_steps <= 0:  # unknown run length: hold the lr
        return base_lr
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_step_lr(optimizer: torch.optim.Optimizer, config: Any, step: int, total: int) -> None:
    """Before optimizer step ``step``: set the cosine lr (no-op for other schedulers)."""
    if config.scheduler != "cosine":
        return
    lr = cosine_lr(step, config.lr, total, config.warmup_steps, config.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr


def run_steps(loader: Any, config: Any) -> int:
    """Optimizer steps of a whole run (epochs × steps per epoch); 0 when the loader has no
    length (the cosine schedule then holds the lr after warm-up)."""
    try:
        n = len(loader)
    except TypeError:
        return 0
    if config.max_steps_per_epoch:
        n = min(n, config.max_steps_per_epoch * config.grad_accum)
    return config.epochs * math.ceil(n / config.grad_accum)


def budget_epochs(loader: Any, config: Any) -> int:
    """``config.epochs`` lowered to the whole epochs that hold about ``config.max_steps``
    optimizer steps (rounded up); ``config.epochs`` when no budget or no loader length."""
    if not config.max_steps:
        return int(config.epochs)
    per_epoch = run_steps(loader, config) // max(config.epochs, 1)
    if per_epoch <= 0:
        return int(config.epochs)
    return max(1, min(int(config.epochs), math.ceil(config.max_steps / per_epoch)))
