"""Simple perturbation baselines that any model must beat (GEARS-format AnnData).

Input: ``obs['condition']`` (``ctrl``, ``A+ctrl``, ``A+B``), ``obs['split']``
(train/val/test), ``var['gene_name']`` and normalised + log1p expression in ``X``.
Every baseline returns ``{condition: predicted mean expression (genes,)}`` for the
conditions asked for, learning only from the *training* perturbations and control cells.

- ``ctrl``: the control mean, i.e. "no change".
- ``train_mean``: the mean over training perturbations of their mean expression (each
  perturbation weighs the same); Csendes et al. 2025 show it beats scGPT/GEARS on
  Adamson/Norman Pearson-delta.
- ``additive``: control + the sum of single-gene changes; a gene without a training single
  contributes the Train Mean change instead (Ahlmann-Eltze et al. 2025's additive model,
  with their mean fallback for unseen genes).
- ``linear``: the linear model of Ahlmann-Eltze, Huber & Anders (Nat Methods 2025):
  ``Y ≈ G W Pᵀ + b`` with ``Y`` the training pseudobulk changes (genes × perturbations),
  ``b`` its row means, ``G`` the gene embedding = the top ``n_pcs`` principal components
  of the training pseudobulk expression (genes as observations), ``P`` the rows of ``G``
  of the perturbed genes (summed for combinations), ``W`` solved by ridge regression
  with penalty ``ridge`` on both sides (their defaults K = 10, λ = 0.1). A perturbation
  whose gene is not among the measured genes has no embedding and gets the Train Mean.

Additive and linear predictions are clipped at 0 (log expression cannot be negative).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltune.errors import InputError

logger = logging.getLogger(__name__)

BASELINES = ("ctrl", "train_mean", "additive", "linear")


def condition_genes(condition: str) -> list[str]:
    """Genes of a GEARS condition string (``A+ctrl`` → [A], ``A+B`` → [A, B], ctrl → [])."""
    return [g for g in str(condition).split("+") if g and g != "ctrl"]


def _dense_rows(X: Any, rows: np.ndarray) -> np.ndarray:
    sub = X[rows]
    return np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float64)


def _require(adata: Any, key: str) -> np.ndarray:
    if key not in adata.obs.columns:
        raise InputError(
            f"obs column {key!r} is missing (columns: {', '.join(map(str, adata.obs.columns))}):"
            " run `celltune perturb prepare` to write GEARS-format data"
        )
    return adata.obs[key].astype(str).to_numpy()


def condition_means(
    adata: Any, conditions: Iterable[str] | None = None, condition_key: str = "condition"
) -> dict[str, np.ndarray]:
    """Mean expression of the cells of each condition (all conditions when None)."""
    cond = _require(adata, condition_key)
    wanted = list(dict.fromkeys(cond)) if conditions is None else list(conditions)
    out = {}
    for c in wanted:
        rows = np.flatnonzero(cond == c)
        if rows.size == 0:
            raise InputError(f"condition {c!r} has no cells: check the condition names")
        sub = adata.X[rows]
        out[c] = np.asarray(sub.mean(axis=0), dtype=np.float64).ravel()
    return out


def train_conditions(
    adata: Any, split_key: str = "split", condition_key: str = "condition", train: str = "train"
) -> list[str]:
    """Perturbed (non-ctrl) conditions with cells in the training split."""
    cond, split = _require(adata, condition_key), _require(adata, split_key)
    out = sorted({c for c, s in zip(cond, split, strict=True) if s == train and c != "ctrl"})
    if not out:
        raise InputError(
            f"no perturbed conditions in split {train!r} of obs[{split_key!r}]: the "
            "baselines need training perturbations; re-split the data"
        )
    return out


class PerturbationBaselines:
    """Fits every baseline once on the training perturbations, then predicts any condition."""

    def __init__(
        self,
        adata: Any,
        *,
        condition_key: str = "condition",
        split_key: str = "split",
        n_pcs: int = 10,
        ridge: float = 0.1,
        seed: int = 0,
    ) -> None:
        cond = _require(adata, condition_key)
        if not (cond == "ctrl").any():
            raise InputError(
                "no control cells (condition 'ctrl'): baselines and metrics are changes vs "
                "control; include the control cells"
            )
        self.genes = (
            adata.var["gene_name"].astype(str).to_numpy()
            if "gene_name" in adata.var.columns
            else np.asarray(adata.var_names, dtype=str)
        )
        self.gene_pos = {g: i for i, g in enumerate(self.genes)}
        self.ctrl = condition_means(adata, ["ctrl"], condition_key)["ctrl"]
        self.train = train_conditions(adata, split_key, condition_key)
        self.train_means = condition_means(adata, self.train, condition_key)
        self.train_mean = np.mean([self.train_means[c] for c in self.train], axis=0)
        self.single_delta = {
            condition_genes(c)[0]: self.train_means[c] - self.ctrl
            for c in self.train
            if len(condition_genes(c)) == 1
        }
        self._fit_linear(n_pcs, ridge, seed)

    def _fit_linear(self, n_pcs: int, ridge: float, seed: int) -> None:
        """Ridge solution of Y ≈ G W Pᵀ + b (see module docstring)."""
        from sklearn.decomposition import PCA

        expr = np.stack([self.train_means[c] for c in self.train], axis=1)  # genes × perts
        k = int(max(1, min(n_pcs, expr.shape[1] - 1, expr.shape[0] - 1)))
        self.G = PCA(n_components=k, random_state=seed).fit_transform(expr)  # genes × k
        usable = [c for c in self.train if self._embedding(c) is not None]
        self.linear_fit_perts = usable
        Y = np.stack([self.train_means[c] - self.ctrl for c in self.train], axis=1)
        self.b = Y.mean(axis=1)
        if not usable:
            self.W = None
            logger.warning(
                "linear baseline: no training perturbation targets a measured gene; it "
                "falls back to Train Mean everywhere"
            )
            return
        Yu = np.stack([self.train_means[c] - self.ctrl for c in usable], axis=1) - self.b[:, None]
        P = np.stack([self._embedding(c) for c in usable], axis=1)  # k × perts
        lhs = self.G.T @ self.G + ridge * np.eye(k)
        rhs = P @ P.T + ridge * np.eye(k)
        self.W = np.linalg.solve(lhs, self.G.T @ Yu @ P.T) @ np.linalg.inv(rhs)
        logger.info(
            "linear baseline: K=%d PCs, fitted on %d/%d training perturbations with a measured "
            "gene",
            k,
            len(usable),
            len(self.train),
        )

    def _embedding(self, condition: str) -> np.ndarray | None:
        genes = condition_genes(condition)
        if not genes or any(g not in self.gene_pos for g in genes):
            return None
        return np.sum([self.G[self.gene_pos[g]] for g in genes], axis=0)

    def _check(self, conditions: Sequence[str]) -> None:
        for c in conditions:
            if c != "ctrl" and not condition_genes(c):
                raise InputError(f"condition {c!r} is not in GEARS form ('A+ctrl' or 'A+B')")

    def predict(self, method: str, conditions: Sequence[str]) -> dict[str, np.ndarray]:
        """``{condition: mean expression}`` of one baseline (see ``BASELINES``)."""
        self._check(conditions)
        if method == "ctrl":
            return {c: self.ctrl.copy() for c in conditions}
        if method == "train_mean":
            return {c: self.train_mean.copy() for c in conditions}
        mean_delta = self.train_mean - self.ctrl
        out = {}
        if method == "additive":
            for c in conditions:
                deltas = [self.single_delta.get(g, mean_delta) for g in condition_genes(c)]
                out[c] = np.maximum(self.ctrl + np.sum(deltas, axis=0), 0.0)
            return out
        if method == "linear":
            for c in conditions:
                e = self._embedding(c)
                if self.W is None or e is None:
                    out[c] = self.train_mean.copy()
                else:
                    out[c] = np.maximum(self.ctrl + self.b + self.G @ self.W @ e, 0.0)
            return out
        raise InputError(f"unknown baseline {method!r}: choose from {', '.join(BASELINES)}")

    def predict_all(
        self, conditions: Sequence[str], methods: Sequence[str] = BASELINES
    ) -> dict[str, dict[str, np.ndarray]]:
        """``{method: {condition: mean expression}}`` for several baselines."""
        return {m: self.predict(m, conditions) for m in methods}


def baseline_predictions(
    adata: Any,
    conditions: Sequence[str],
    methods: Sequence[str] = BASELINES,
    **kwargs: Any,
) -> dict[str, dict[str, np.ndarray]]:
    """Convenience wrapper: fit :class:`PerturbationBaselines` and predict ``conditions``."""
    return PerturbationBaselines(adata, **kwargs).predict_all(conditions, methods)


def linear_unseen_coverage(adata: Any, conditions: Mapping[str, Any] | Sequence[str]) -> float:
    """Fraction of ``conditions`` whose genes are all measured (the linear model's reach)."""
    genes = (
        set(adata.var["gene_name"].astype(str))
        if "gene_name" in adata.var.columns
        else set(map(str, adata.var_names))
    )
    conds = list(conditions)
    ok = [all(g in genes for g in condition_genes(c)) for c in conds]
    return float(np.mean(ok)) if ok else float("nan")
