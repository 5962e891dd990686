"""Vector scores shared by the perturbation metrics (``pearson``, ``mse``).

A module of its own so that ``eval.perturbation`` and ``eval.perturbation_discrimination``
both use it without importing each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from celltune.errors import InputError

ArrayLike = Any


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson r of two vectors; NaN (constant or too short input) becomes 0 as in GEARS."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"pearson needs vectors of one length, got {x.shape} and {y.shape}")
    if x.size < 2:
        return 0.0
    xc, yc = x - x.mean(), y - y.mean()
    nx, ny = np.linalg.norm(xc), np.linalg.norm(yc)
    # Constant up to round-off (e.g. a difference of identical predictions) counts as constant.
    if nx <= 1e-10 * (np.linalg.norm(x) + 1e-300) or ny <= 1e-10 * (np.linalg.norm(y) + 1e-300):
        return 0.0
    denom = nx * ny
    if not np.isfinite(denom) or denom == 0.0:
        return 0.0
    r = float((xc * yc).sum() / denom)
    return float(np.clip(r, -1.0, 1.0)) if np.isfinite(r) else 0.0


def mse(x: ArrayLike, y: ArrayLike) -> float:
    """Mean squared error of two vectors."""
    d = np.asarray(x, dtype=np.float64).ravel() - np.asarray(y, dtype=np.float64).ravel()
    return float(np.mean(d * d)) if d.size else float("nan")
