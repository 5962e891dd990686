"""Training options: one dataclass shared by every task that fine-tunes a model.

Defaults follow scGPT's fine-tuning scripts (SPEC §4 and §6): Adam at lr 1e-4, StepLR with
gamma 0.9 per epoch, batch 64, gradient clipping at norm 1.0. Settings that depend on the
machine (device, AMP, pinned memory) default to ``"auto"``/``None`` and are resolved when the
:class:`~celltune.train.loop.Trainer` starts, so one config file works on a laptop and a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from celltune.errors import InputError

logger = logging.getLogger(__name__)

AmpChoice = Literal["off", "auto", "bf16", "fp16"]
DeviceChoice = Literal["auto", "cpu", "cuda"]

_AMP_CHOICES = ("off", "auto", "bf16", "fp16")
_DEVICE_CHOICES = ("auto", "cpu", "cuda")
_SCHEDULERS = ("step", "cosine", "none")


@dataclass
class TrainConfig:
    """Every knob of the training loop (see ``docs/training.md``).

    ``max_steps_per_epoch`` counts optimizer steps (each ``grad_accum`` mini-batches); it
    exists so CI-sized runs can cut an epoch short. ``select_metric=None`` means
    ``"val/loss"`` when an ``eval_fn`` is given, else ``"train/loss"``. ``adam_eps=None``
    means 1e-8, or 1e-4 under fp16 AMP (scGPT's value; fp16 gradients underflow 1e-8).
    """

    epochs: int = 30
    lr: float = 1e-4
    adam_eps: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 64
    eval_batch_size: int | None = None
    scheduler: Literal["step", "cosine", "none"] = "step"
    step_size: int = 1
    gamma: float = 0.9
    # scheduler="cosine" (train.schedule): linear warm-up, then cosine to min_lr_ratio·lr
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    amp: AmpChoice = "auto"
    device: DeviceChoice = "auto"
    seed: int = 0
    patience: int | None = None
    select_metric: str | None = None
    select_mode: Literal["min", "max"] = "min"
    num_workers: int = 0
    pin_memory: bool | None = None
    quiet: bool = False
    log_every: int = 50
    checkpoint_every: int = 1
    max_steps_per_epoch: int | None = None
    # Training budget in optimizer steps: tasks lower ``epochs`` to the whole epochs that
    # hold about this many steps (train.schedule.budget_epochs), so one setting suits 1k
    # and 100k cells.
    max_steps: int | None = None
    compile: bool = False
    find_unused_parameters: bool = True

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "step_size": self.step_size,
            "grad_accum": self.grad_accum,
            "log_every": self.log_every,
            "checkpoint_every": self.checkpoint_every,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}; set it >= 1")
        for name in ("eval_batch_size", "patience", "max_steps_per_epoch", "max_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(
                    f"{name} must be a positive integer or None, got {value!r}; "
                    "set it >= 1 or leave it unset"
                )
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr!r}; scGPT uses 1e-4")
        if self.adam_eps is not None and not self.adam_eps > 0:
            raise InputError(f"adam_eps must be > 0, got {self.adam_eps!r}; leave it unset")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 < self.gamma <= 1:
            raise InputError(f"gamma must be in (0, 1], got {self.gamma!r}; scGPT uses 0.9")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"grad_clip must be > 0 or None (no clipping), got {self.grad_clip!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise InputError(
                f"warmup_steps must be >= 0 and min_lr_ratio in [0, 1] (got "
                f"{self.warmup_steps}, {self.min_lr_ratio})"
            )
        if self.num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {self.num_workers!r}")
        _check_choice("amp", self.amp, _AMP_CHOICES)
        _check_choice("device", self.device, _DEVICE_CHOICES)
        _check_choice("scheduler", self.scheduler, _SCHEDULERS)
        _check_choice("select_mode", self.select_mode, ("min", "max"))

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (what ``config.yaml`` and checkpoints record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a YAML section); unknown keys are an error, not ignored,
        so a typo such as ``learning_rate`` cannot silently fall back to a default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(
                f"unknown training option(s) {unknown}; valid options are {sorted(names)}"
            )
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- resolution of "auto" settings ---------------------------------------------------
    def resolve_device(self, local_rank: int | None = None) -> torch.device:
        """``auto`` → CUDA when available, else CPU; under DDP the rank's own GPU."""
        want = self.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise InputError(
                    "device='cuda' was requested but no CUDA GPU is available to torch; "
                    "use device='cpu' or 'auto', or install a CUDA build of torch"
                )
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")

    def resolve_amp(self, device: torch.device) -> Literal["off", "bf16", "fp16"]:
        """``auto`` → fp16 (+ GradScaler) on CUDA, off on CPU (SPEC/issue 7)."""
        if self.amp == "auto":
            return "fp16" if device.type == "cuda" else "off"
        if self.amp == "fp16" and device.type != "cuda":
            logger.warning(
                "amp='fp16' on %s: float16 autocast on CPU is slow and rarely useful; "
                "prefer amp='bf16' or amp='off'",
                device,
            )
        return self.amp  # type: ignore[return-value]

    def resolve_adam_eps(self, amp: str) -> float:
        """Adam epsilon actually used: 1e-4 under fp16 (as scGPT), else 1e-8."""
        if self.adam_eps is not None:
            return self.adam_eps
        return 1e-4 if amp == "fp16" else 1e-8

    def resolve_pin_memory(self, device: torch.device) -> bool:
        """Pinned host memory only helps host→GPU copies."""
        return device.type == "cuda" if self.pin_memory is None else self.pin_memory


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}")
