"""Cheap, label-free health checks of a cell embedding (collapse, length tracking, mixing).

They live in :mod:`celltune.train.embedding_health` because the training loop logs them
each epoch; this module keeps them under the evaluation API as well.
"""

from __future__ import annotations

from celltune.train.embedding_health import (
    batch_mixing,
    embedding_health,
    expression_pca,
    length_correlation,
    neighbour_preservation,
    participation_ratio,
    pca_spectrum,
    reference_health,
)

__all__ = [
    "batch_mixing",
    "embedding_health",
    "expression_pca",
    "length_correlation",
    "neighbour_preservation",
    "participation_ratio",
    "pca_spectrum",
    "reference_health",
]
