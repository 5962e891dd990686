"""What the training loop hands to a task's ``step_fn`` / ``eval_fn``, and what it returns.

``StepContext`` (device, AMP, epoch, rank, ...), ``History`` (per-epoch records, written
as ``history.csv``) and ``NonFiniteLossError``.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from celltune.errors import CelltuneError
from celltune.files import write_text_atomic
from celltune.train.config import TrainConfig

StepFn = Callable[[nn.Module, Any, "StepContext"], "tuple[torch.Tensor, Mapping[str, Any]]"]
EvalFn = Callable[[nn.Module, "StepContext"], Mapping[str, float]]


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
