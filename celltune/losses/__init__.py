"""celltune.losses layer (see docs/ARCHITECTURE.md): SPEC §4 losses and objectives."""

from celltune.losses.functional import (
    bernoulli_nll,
    cce_loss,
    cross_entropy,
    ecs_loss,
    masked_mse,
    masked_relative_error,
    spread_loss,
)
from celltune.losses.objective import IntegrationObjective, ObjectiveWeights, PerturbationObjective

__all__ = [
    "IntegrationObjective",
    "ObjectiveWeights",
    "PerturbationObjective",
    "bernoulli_nll",
    "cce_loss",
    "cross_entropy",
    "ecs_loss",
    "masked_mse",
    "masked_relative_error",
    "spread_loss",
]
