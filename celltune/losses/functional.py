"""Loss functions exactly as SPEC §4 (scGPT's ``scgpt.loss`` semantics).

All masked losses sum over the whole mini-batch and divide by the number of scored
positions, so a mini-batch with more masked tokens weighs each token the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from celltune.errors import InputError
from celltune.model.heads import cce_from_embeddings, ecs_from_embeddings, gather_with_grad

__all__ = [
    "bernoulli_nll",
    "cce_loss",
    "cross_entropy",
    "ecs_loss",
    "masked_mse",
    "masked_relative_error",
    "spread_loss",
]


def _check(pred: Tensor, target: Tensor, mask: Tensor, name: str) -> Tensor:
    if pred.shape != target.shape or mask.shape != pred.shape:
        raise InputError(
            f"{name}: prediction {tuple(pred.shape)}, target {tuple(target.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    return mask.to(pred.dtype)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``sum((x·m − y·m)²) / sum(m)``; an empty mask gives NaN, as in the reference."""
    m = _check(pred, target, mask, "masked_mse")
    return F.mse_loss(pred * m, target * m, reduction="sum") / m.sum()


def bernoulli_nll(prob: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``−sum(m · log Bernoulli(p).prob(y > 0)) / sum(m)``, p = P(expression non-zero).

    Computed as binary cross-entropy on probabilities, which is what
    ``torch.distributions.Bernoulli(probs=p).log_prob`` evaluates (with its clamping of
    p to [eps, 1 − eps]).
    """
    m = _check(prob, target, mask, "bernoulli_nll")
    eps = torch.finfo(prob.dtype).eps
    p = prob.clamp(eps, 1 - eps)
    y = (target > 0).to(prob.dtype)
    log_prob = y * torch.log(p) + (1 - y) * torch.log1p(-p)
    return -(log_prob * m).sum() / m.sum()


def ecs_loss(cell_emb: Tensor, threshold: float = 0.8) -> Tensor:
    """Elastic cell similarity: ``mean(1 − (relu(cos with diag 0) − threshold)²)`` over B×B."""
    return ecs_from_embeddings(cell_emb, threshold)


def spread_loss(cell_emb: Tensor, eps: float = 1e-4) -> Tensor:
    """Anti-collapse term on a mini-batch of cell embeddings (VICReg's variance and
    covariance terms, Bardes et al. 2022): ``mean_j relu(1 − std_j) + Σ_{i≠j} cov_ij² / d``.

    Not part of scGPT. From scratch the embedding collapses onto one axis during training
    (participation ratio 25 → 1.1 on Kang 2,000 cells, issue 16); this pushes every
    dimension to vary across cells and the dimensions to decorrelate.
    """
    n, d = cell_emb.shape
    if n < 2:
        return cell_emb.new_zeros(())
    z = cell_emb.float() - cell_emb.float().mean(0)
    std = torch.sqrt(z.var(0) + eps)
    cov = (z.t() @ z) / (n - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return torch.relu(1.0 - std).mean() + off.pow(2).sum() / d


def cce_loss(
    emb_a: Tensor, emb_b: Tensor, temperature: float = 0.5, gather: bool = False
) -> Tensor:
    """Contrastive cell embedding: CE of cosine(a_i, b_j)/T against the diagonal.

    ``gather=True`` all-gathers both views across ranks first (local slice keeps its
    gradient), so every rank contrasts against the global batch.
    """
    if gather:
        emb_a, emb_b = gather_with_grad(emb_a), gather_with_grad(emb_b)
    return cce_from_embeddings(emb_a, emb_b, temperature)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """CE for the DAB / CLS heads; labels −1 (unknown cell type) are ignored."""
    return F.cross_entropy(logits, labels.long(), ignore_index=-1)


def masked_relative_error(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``mean(|x − y| / (y + 1e-6))`` at masked positions (a metric, not a loss)."""
    mask = mask.bool()
    if not bool(mask.any()):
        raise InputError("masked_relative_error: the mask selects no position")
    return (torch.abs(pred[mask] - target[mask]) / (target[mask] + 1e-6)).mean()
