"""Cheap, label-free health checks of a cell embedding (collapse, length tracking, mixing).

A collapsed embedding (one dominant direction) or one that mostly encodes how many genes a
cell expresses looks fine in the training loss but integrates badly (issue 16). These
checks need no labels, so they can run on a fixed validation sample during training.
"""

from __future__ import annotations

import numpy as np

__all__ = ["length_correlation", "participation_ratio", "pca_spectrum"]


def pca_spectrum(emb: np.ndarray) -> np.ndarray:
    """Variances of the principal components of ``emb`` (cells × dims), descending."""
    x = np.asarray(emb, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    return (s**2) / max(x.shape[0] - 1, 1)


def participation_ratio(emb: np.ndarray) -> float:
    """Effective rank (sum λ)² / sum λ² of the PCA spectrum: 1 = collapsed onto a line."""
    lam = pca_spectrum(emb)
    denom = float((lam**2).sum())
    return float(lam.sum() ** 2 / denom) if denom > 0 else 0.0


def length_correlation(emb: np.ndarray, n_expressed: np.ndarray) -> float:
    """|Pearson r| between the embedding's first principal component and each cell's
    number of expressed genes (its sequence length without zeros)."""
    x = np.asarray(emb, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    pc1 = x @ vt[0]
    n = np.asarray(n_expressed, dtype=np.float64)
    if pc1.std() == 0 or n.std() == 0:
        return 0.0
    return float(abs(np.corrcoef(pc1, n)[0, 1]))
