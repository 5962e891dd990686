"""What the training loop logs: the step's loss terms, the time estimate, epoch lines."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger("celltune.train.loop")  # the loop's messages keep its logger name

#: The run's training time is estimated from ETA_BATCHES mini-batches after the first
#: ETA_SKIP: the first ones pay for warm-up (allocation, loader start) and made the
#: estimate 5x too long on the 12k-cell Kang file (44.6 min estimated, 9 min taken).
ETA_SKIP = 3
ETA_BATCHES = 8


def log_eta(elapsed: float, done: int, per_epoch: int, epochs_left: int) -> None:
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


def term_values(loss: torch.Tensor, terms: Mapping[str, Any]) -> dict[str, float]:
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


def fmt(values: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


#: the terms an epoch line shows (in this order, when present); history.csv has them all
EPOCH_LINE_KEYS = ("train/loss", "val/loss", "val/pr", "val/mixing", "val/preserve", "lr", "time_s")
#: an epoch line longer than this drops its last terms
EPOCH_LINE_MAX = 150


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def epoch_line(record: Mapping[str, Any], select_metric: str | None, epochs: int) -> str:
    """One short line per epoch: the loss, the model-selection metric, lr and time.

    Every term of the epoch stays in ``history.csv`` (and the progress bar); the log line
    keeps to about 150 characters, e.g. ``epoch 3/30: train/loss=1472, val/mse=759.6,
    val/loss=1427, lr=0.0001, time_s=21.3``.
    """
    keys = [EPOCH_LINE_KEYS[0]]
    if select_metric and select_metric not in keys:
        keys.append(select_metric)
    keys += [k for k in EPOCH_LINE_KEYS[1:] if k not in keys]
    line = f"epoch {record['epoch']}/{epochs}:"
    parts = [f"{k}={_short(record[k])}" for k in keys if k in record]
    for i, part in enumerate(parts):
        if len(line) + len(part) + 2 > EPOCH_LINE_MAX:
            break
        line += (" " if i == 0 else ", ") + part
    return line
