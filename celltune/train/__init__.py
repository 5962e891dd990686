"""celltune.train: the one training loop (see docs/ARCHITECTURE.md, docs/training.md).

Tasks configure :class:`Trainer` with a ``step_fn`` (the objective of one mini-batch) and an
``eval_fn`` (validation metrics); resume, AMP, gradient accumulation, early stopping and DDP
behave the same for every task.
"""

from celltune.train.config import TrainConfig
from celltune.train.loop import (
    BEST_STATE_NAME,
    CHECKPOINT_NAME,
    HISTORY_NAME,
    History,
    NonFiniteLossError,
    StepContext,
    Trainer,
    check_resume_input,
    input_fingerprint,
    make_loader,
)

__all__ = [
    "BEST_STATE_NAME",
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
    "History",
    "NonFiniteLossError",
    "StepContext",
    "TrainConfig",
    "Trainer",
    "check_resume_input",
    "input_fingerprint",
    "make_loader",
]
