"""Cheap, label-free health checks of a cell embedding, run while a model trains.

A collapsed embedding (one dominant direction) or one that mostly encodes how many genes a
cell expresses looks fine in the training loss but integrates badly (issue 16). These
checks need no labels, so the training loop can score a fixed validation sample each epoch
and a user sees collapse or unmixed batches long before the scIB metrics at the end:

- ``pr``: participation ratio of the embedding's PCA spectrum (1 = collapsed onto a line);
- ``mixing``: how often a cell's nearest neighbours come from another batch, relative to
  how often they would if neighbours were drawn at random (1 = fully mixed, 0 = apart);
- ``preserve``: the overlap of each cell's nearest neighbours in the embedding with its
  nearest neighbours in the PCA of the same cells' expression (1 = same neighbourhoods).

The same two neighbourhood scores of the expression PCA itself are the reference a user
compares with (``reference_health``).
"""

from __future__ import annotations

import numpy as np

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

#: neighbours per cell for the mixing and preservation scores
HEALTH_K = 15
#: principal components of the expression that the preservation score compares with
HEALTH_PCS = 30


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


def expression_pca(expression: np.ndarray, n_comps: int = HEALTH_PCS) -> np.ndarray:
    """PCA (centred, not scaled) of ``expression`` (cells × genes): the unintegrated view."""
    x = np.asarray(expression, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    k = max(1, min(n_comps, x.shape[0] - 1, x.shape[1]))
    return u[:, :k] * s[:k]


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's ``k`` nearest other rows (Euclidean), exact: the samples are
    small (≤ a few thousand cells), so a brute-force search is cheaper than an index."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, x.shape[0] - 1)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    idx = nn.kneighbors(x, return_distance=False)
    return idx[:, 1:]


def batch_mixing(emb: np.ndarray, batches: np.ndarray, k: int = HEALTH_K) -> float:
    """Mean over cells of (share of neighbours from other batches) / (the share expected
    at random, 1 − own batch's share of the sample), clipped to [0, 1]."""
    b = np.asarray(batches)
    _, codes, counts = np.unique(b, return_inverse=True, return_counts=True)
    if counts.size < 2 or b.size < 3:
        return float("nan")
    idx = _neighbours(np.asarray(emb, dtype=np.float64), k)
    other = (codes[idx] != codes[:, None]).mean(1)
    expected = 1.0 - (counts[codes] - 1) / (b.size - 1)
    return float(np.clip(other / np.maximum(expected, 1e-12), 0.0, 1.0).mean())


def neighbour_preservation(emb: np.ndarray, reference: np.ndarray, k: int = HEALTH_K) -> float:
    """Mean share of each cell's ``k`` nearest neighbours in ``emb`` that are also among its
    ``k`` nearest neighbours in ``reference`` (same cells, same order)."""
    if emb.shape[0] < 3:
        return float("nan")
    a = _neighbours(np.asarray(emb, dtype=np.float64), k)
    r = _neighbours(np.asarray(reference, dtype=np.float64), k)
    hits = [np.intersect1d(a[i], r[i], assume_unique=True).size for i in range(a.shape[0])]
    return float(np.mean(hits) / a.shape[1])


def embedding_health(
    emb: np.ndarray, batches: np.ndarray | None, expression: np.ndarray | None
) -> dict[str, float]:
    """``{"pr", "mixing", "preserve"}`` of one embedding sample (missing parts left out)."""
    out = {"pr": participation_ratio(emb)}
    if batches is not None:
        out["mixing"] = batch_mixing(emb, batches)
    if expression is not None:
        out["preserve"] = neighbour_preservation(emb, expression_pca(expression))
    return out


def reference_health(batches: np.ndarray | None, expression: np.ndarray) -> dict[str, float]:
    """The same scores for the expression PCA of the sample (what "no integration" gives;
    its ``preserve`` is 1 by construction and left out)."""
    pca = expression_pca(expression)
    out = {"pr": participation_ratio(pca)}
    if batches is not None:
        out["mixing"] = batch_mixing(pca, batches)
    return out
