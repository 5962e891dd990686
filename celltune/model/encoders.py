"""Token encoders: gene, value and batch-label embeddings, and domain-specific BatchNorm.

Module and parameter names mirror scGPT's so that ``state_dict`` keys are identical
(``encoder.embedding.weight``, ``value_encoder.linear1.weight``, ``dsbn.bns.0.*``, ...).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

DSBN_EPS = 6.1e-5  # scGPT's value (keeps fp16 variances away from zero)


class GeneEncoder(nn.Module):
    """Gene-token embedding followed by LayerNorm (scGPT ``GeneEncoder``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    """Maps a scalar expression value to a vector: Linear → ReLU → Linear → LayerNorm → dropout.

    Values are clamped at ``max_value`` (512) as in scGPT so that an un-binned raw count
    cannot blow up the first layer.
    """

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: float = 512) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: Tensor) -> Tensor:
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class CategoryValueEncoder(nn.Module):
    """Embedding of the bin index (``input_emb_style="category"``) → LayerNorm."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)
        self.num_embeddings = num_embeddings

    def forward(self, x: Tensor) -> Tensor:
        # Negative values (pad -2, mask -1) wrap like Python indices, the way PyTorch
        # normalises scGPT's negative padding_idx=pad_value; nn.Embedding itself would
        # raise on them. Use n_input_bins = n_bins + 2 so they do not collide with bins.
        idx = x.long()
        idx = torch.where(idx < 0, idx + self.num_embeddings, idx)
        return self.enc_norm(self.embedding(idx.clamp(0, self.num_embeddings - 1)))


class BatchLabelEncoder(nn.Module):
    """Batch-label embedding → LayerNorm (scGPT ``BatchLabelEncoder``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, labels: Tensor, known: Tensor | None = None) -> Tensor:
        """Embed ``labels`` (B,); rows where ``known`` is False get the mean known embedding.

        The mean of all batch vectors is the neutral choice for a batch never seen in
        training (there is no row to look up), documented as the unseen-batch fallback.
        """
        if known is None or bool(known.all()):
            return self.enc_norm(self.embedding(labels))
        all_rows = self.enc_norm(self.embedding.weight)  # (n_batches, d)
        fallback = all_rows.mean(0, keepdim=True)
        safe = torch.where(known, labels, torch.zeros_like(labels))
        out = all_rows[safe]
        return torch.where(known.unsqueeze(1), out, fallback.expand_as(out))


class DomainSpecificBatchNorm1d(nn.Module):
    """One affine-free ``BatchNorm1d`` per batch (domain), applied over the embedding dim.

    ``mode="per_cell"`` normalises every cell with its own batch's norm (in training the
    statistics of each batch's cells within the mini-batch); ``mode="first"`` reproduces
    scGPT, which normalises the whole mini-batch with the first cell's batch. Unknown
    batches at inference (label ``-1`` here) use the pooled running statistics of all
    batches (``unseen="pooled"``) or their own statistics (``unseen="own"``).
    """

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = DSBN_EPS,
        momentum: float = 0.1,
        affine: bool = False,
    ) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.bns = nn.ModuleList(
            [
                nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=affine)
                for _ in range(num_domains)
            ]
        )
        self.eps = eps

    def pooled_stats(self) -> tuple[Tensor, Tensor]:
        """Mean and variance of the mixture of all batches' running distributions."""
        means = torch.stack([bn.running_mean for bn in self.bns])  # type: ignore[misc]
        vars_ = torch.stack([bn.running_var for bn in self.bns])  # type: ignore[misc]
        mean = means.mean(0)
        var = vars_.mean(0) + means.var(0, unbiased=False)
        return mean, var

    def forward(
        self, x: Tensor, labels: Tensor | None, *, mode: str = "per_cell", unseen: str = "pooled"
    ) -> Tensor:
        """Normalise ``x`` (B, L, d); ``labels`` (B,) with -1 for an unknown batch."""
        if labels is None:
            labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        if mode == "first":
            first = int(labels[0].item())
            if first >= 0:
                return self.bns[first](x.transpose(1, 2)).transpose(1, 2)
            labels = torch.full_like(labels, -1)
        uniq = torch.unique(labels).tolist()
        if len(uniq) == 1 and uniq[0] >= 0:  # the usual per-batch mini-batch: no copies
            return self.bns[uniq[0]](x.transpose(1, 2)).transpose(1, 2)
        if not self.training and min(uniq) >= 0:
            # eval: every cell uses its batch's running statistics, one vectorised op
            means = torch.stack([bn.running_mean for bn in self.bns])[labels]  # type: ignore[misc]
            vars_ = torch.stack([bn.running_var for bn in self.bns])[labels]  # type: ignore[misc]
            return (x - means.unsqueeze(1)) * torch.rsqrt(vars_.unsqueeze(1) + self.eps)
        out = torch.empty_like(x)
        for lab in uniq:
            rows = (labels == lab).nonzero(as_tuple=True)[0]
            xs = x.index_select(0, rows).transpose(1, 2)  # (b, d, L)
            if lab >= 0:
                ys = self.bns[lab](xs)
            elif unseen == "own" or not self._has_stats():
                ys = F.batch_norm(xs, None, None, training=True, eps=self.eps)
            else:
                mean, var = self.pooled_stats()
                ys = F.batch_norm(xs, mean, var, training=False, eps=self.eps)
            out.index_copy_(0, rows, ys.transpose(1, 2))
        return out

    def _has_stats(self) -> bool:
        tracked = [int(bn.num_batches_tracked) for bn in self.bns]  # type: ignore[arg-type]
        if not any(tracked):
            warnings.warn(
                "DSBN has no running statistics yet; normalising unseen batches with their "
                "own statistics",
                stacklevel=3,
            )
            return False
        return True
