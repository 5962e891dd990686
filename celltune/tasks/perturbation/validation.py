"""Validation during training: which perturbations validate, and their metrics.

The model is selected on validation ``pearson_delta``: absolute Pearson is ~0.99 for any
model that copies its input, so it cannot tell models apart.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from celltune.tasks.perturbation.data import PerturbationData
from celltune.tasks.perturbation.predict import predict_cells

logger = logging.getLogger(__name__)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; NaN (constant input) counts as 0, as in GEARS."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    r = float(np.corrcoef(a, b)[0, 1])
    return r if np.isfinite(r) else 0.0


def validation_metrics(
    model: torch.nn.Module,
    controls: np.ndarray,
    gene_ids: np.ndarray,
    cols_of: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    de: dict[str, np.ndarray],
    ctrl_mean: np.ndarray,
    *,
    max_seq_len: int,
    batch_size: int,
    seed: int,
    amp_dtype: torch.dtype | None,
    n_measured: int | None = None,
    include_zero_gene: str = "all",
) -> dict[str, float]:
    """Mean over validation perturbations of pearson(_delta), DE pearson_delta and MSE."""
    rows: list[dict[str, float]] = []
    for cond, cols in cols_of.items():
        pred = predict_cells(
            model,
            controls,
            gene_ids,
            cols,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            seed=seed,
            amp_dtype=amp_dtype,
            n_measured=n_measured,
            include_zero_gene=include_zero_gene,
        ).mean(axis=0)
        t = truth[cond]
        d = de[cond]
        rows.append(
            {
                "val/pearson": _pearson(pred, t),
                "val/pearson_delta": _pearson(pred - ctrl_mean, t - ctrl_mean),
                "val/pearson_de_delta": _pearson(pred[d] - ctrl_mean[d], t[d] - ctrl_mean[d])
                if len(d) > 1
                else 0.0,
                "val/mse": float(np.mean((pred - t) ** 2)),
            }
        )
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def choose_validation(pdata: PerturbationData, seed: int) -> tuple[dict[str, np.ndarray], str]:
    """Validation cells per perturbation, and a sentence saying where they come from.

    The val split's perturbations of measured genes when there are any; else whole
    training perturbations held out; else held-out cells of training perturbations. Only
    perturbations of measured genes validate: an unmeasured gene never seen in training
    has an untrained embedding, so its score says nothing about the model.
    """
    val_perts = [c for c in pdata.perturbations("val") if pdata.measured(c)]
    val_cells: dict[str, np.ndarray] = {}
    if val_perts:
        validation = "val split"
        for c in val_perts:
            val_cells[c] = np.flatnonzero((pdata.conditions == c) & (pdata.split == "val"))
    else:
        validation = _hold_out_training(pdata, seed, val_cells)
    if not val_cells:  # no measured perturbed gene anywhere (Norman subset): token flags
        for c in pdata.perturbations("val"):
            if pdata.placeable(c):
                val_cells[c] = np.flatnonzero((pdata.conditions == c) & (pdata.split == "val"))
        validation = "val split, perturbations of unmeasured genes only (token flags)"
    return val_cells, validation


def _hold_out_training(pdata: PerturbationData, seed: int, val_cells: dict[str, np.ndarray]) -> str:
    """Fill ``val_cells`` from the training split (the val split has nothing to validate on).

    Validation must mirror the test (perturbations the model never saw), so hold out whole
    training perturbations of measured genes when there are enough of them; held-out cells
    of seen perturbations only measure memorisation.
    """
    rng = np.random.default_rng([seed, 13])
    measured_train = [c for c in pdata.perturbations("train") if pdata.measured(c)]
    if len(measured_train) >= 3:
        k = max(1, round(0.2 * len(measured_train)))
        for c in sorted(rng.choice(measured_train, k, replace=False).tolist()):
            val_cells[c] = np.flatnonzero((pdata.conditions == c) & (pdata.split == "train"))
        validation = (
            f"{k} training perturbation(s) of measured genes held out whole "
            f"({', '.join(val_cells)}); the val split has none"
        )
        logger.warning("validation: %s", validation)
        return validation
    logger.warning(
        "the val split has no perturbation of a measured gene and the training split "
        "too few to hold one out; validating on held-out cells (10%) of the training "
        "perturbations (seen perturbations: a weaker model-selection signal)"
    )
    for c in pdata.perturbations("train"):
        if not pdata.placeable(c):
            continue
        idx = np.flatnonzero((pdata.conditions == c) & (pdata.split == "train"))
        if len(idx) < 2:
            continue
        val_cells[c] = np.sort(rng.choice(idx, max(1, len(idx) // 10), replace=False))
    return "held-out 10% of the cells of each training perturbation"
