"""Output heads: expression decoders, MVC/GEPC, classifier, adversarial discriminator.

Names and layer indices mirror scGPT (``decoder.fc.0``, ``cls_decoder._decoder.3``,
``mvc_decoder.W``, ``grad_reverse_discriminator.out_layer``) so weights load unchanged.
The two functions at the end (ECS, CCE) live here, not in ``celltune.losses``, because
the model returns ``loss_ecs`` / ``loss_cce`` itself (scGPT's interface) and the model
layer may not import the losses layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _mlp(d_in: int, d_model: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, 1),
    )


def _first_linear_split(layer: nn.Linear, h: Tensor, extra: Tensor | None) -> Tensor:
    """``layer(cat([h, extra broadcast over L]))`` without building the (B, L, 2d) tensor.

    The batch embedding is the same for every token of a cell, so its half of the first
    matrix product is computed once per cell and broadcast: same result, half the
    memory traffic of scGPT's ``torch.cat(... .repeat(1, L, 1))``.
    """
    if extra is None:
        return layer(h)
    d = h.shape[-1]
    w_h, w_e = layer.weight[:, :d], layer.weight[:, d:]
    per_cell = F.linear(extra, w_e, layer.bias)  # (B, d_model)
    return F.linear(h, w_h) + per_cell.unsqueeze(1)


class ExprDecoder(nn.Module):
    """Per-token value prediction (MLM/MGM), optionally with a zero-probability head."""

    def __init__(
        self, d_model: int, explicit_zero_prob: bool = False, use_batch_labels: bool = False
    ) -> None:
        super().__init__()
        d_in = 2 * d_model if use_batch_labels else d_model
        self.fc = _mlp(d_in, d_model)
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.zero_logit = _mlp(d_in, d_model)

    @staticmethod
    def _run(seq: nn.Sequential, h: Tensor, extra: Tensor | None) -> Tensor:
        x = _first_linear_split(seq[0], h, extra)  # type: ignore[arg-type]
        for layer in list(seq)[1:]:
            x = layer(x)
        return x.squeeze(-1)

    def forward(self, h: Tensor, batch_emb: Tensor | None = None) -> dict[str, Tensor]:
        """``h`` (B, L, d) transformer output; ``batch_emb`` (B, d) or None."""
        out = {"pred": self._run(self.fc, h, batch_emb)}
        if self.explicit_zero_prob:
            out["zero_probs"] = torch.sigmoid(self._run(self.zero_logit, h, batch_emb))
        return out


class AffineExprDecoder(nn.Module):
    """scGPT's generator decoder: ``pred = coeff(h) * values + bias(h)``."""

    def __init__(
        self,
        d_model: int,
        explicit_zero_prob: bool = False,
        activation: str | None = None,
        adaptive_bias: bool = False,
    ) -> None:
        super().__init__()
        self.coeff_decoder = ExprDecoder(d_model, explicit_zero_prob=explicit_zero_prob)
        self.bias_decoder = ExprDecoder(d_model, explicit_zero_prob=explicit_zero_prob)
        self.explicit_zero_prob = explicit_zero_prob
        self.adaptive_bias = adaptive_bias
        self.activation: nn.Module | None = None
        if activation is not None:
            if not hasattr(nn, activation):
                raise ValueError(f"unknown decoder activation {activation!r}")
            self.activation = getattr(nn, activation)()

    def forward(self, h: Tensor, values: Tensor) -> dict[str, Tensor]:
        coeff = self.coeff_decoder(h)
        bias = self.bias_decoder(h)
        c, b = coeff["pred"], bias["pred"]
        if self.activation is not None:
            c, b = self.activation(c), self.activation(b)
        if self.adaptive_bias:
            nonzero_mean = values.sum(1, keepdim=True) / (values != 0).sum(1, keepdim=True)
            b = b * nonzero_mean
        out = {"pred": c * values + b}
        if self.explicit_zero_prob:
            out["zero_probs"] = coeff["zero_probs"]
        return out


class _MLPClassifier(nn.Module):
    """(Linear, activation, LayerNorm) × (nlayers-1) then Linear: scGPT's ModuleList layout."""

    def __init__(self, d_model: int, n_out: int, nlayers: int, activation: type[nn.Module]):
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(nlayers - 1):
            self._decoder.append(nn.Linear(d_model, d_model))
            self._decoder.append(activation())
            self._decoder.append(nn.LayerNorm(d_model))
        self.out_layer = nn.Linear(d_model, n_out)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class ClsDecoder(_MLPClassifier):
    """Cell-type classifier on the cell embedding (CLS)."""

    def __init__(self, d_model: int, n_cls: int, nlayers: int = 3) -> None:
        super().__init__(d_model, n_cls, nlayers, nn.ReLU)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.lambd, None  # type: ignore[attr-defined]


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Identity forward, gradient × (−lambd) backward: the encoder learns to fool DAB."""
    return _GradReverse.apply(x, lambd)  # type: ignore[no-any-return]


class AdversarialDiscriminator(_MLPClassifier):
    """Batch discriminator behind a gradient-reversal layer (DAB / DAR)."""

    def __init__(
        self, d_model: int, n_cls: int, nlayers: int = 3, reverse_grad: bool = True
    ) -> None:
        super().__init__(d_model, n_cls, nlayers, nn.LeakyReLU)
        self.reverse_grad = reverse_grad

    def forward(self, x: Tensor) -> Tensor:
        if self.reverse_grad:
            x = grad_reverse(x, 1.0)
        return super().forward(x)


class MVCDecoder(nn.Module):
    """Predicts each gene's value from the cell embedding and the gene's embedding (GEPC)."""

    def __init__(
        self,
        d_model: int,
        arch_style: str = "inner product",
        explicit_zero_prob: bool = False,
        use_batch_labels: bool = False,
    ) -> None:
        super().__init__()
        d_in = 2 * d_model if use_batch_labels else d_model
        self.arch_style = arch_style
        self.explicit_zero_prob = explicit_zero_prob
        if arch_style == "inner product":
            self.gene2query = nn.Linear(d_model, d_model)
            self.query_activation = nn.Sigmoid()
            self.W = nn.Linear(d_model, d_in, bias=False)
            if explicit_zero_prob:
                self.W_zero_logit = nn.Linear(d_model, d_in)
        elif arch_style == "concat query":
            self.gene2query = nn.Linear(d_model, 64)
            self.query_activation = nn.Sigmoid()
            self.fc1 = nn.Linear(d_in + 64, 64)
            self.hidden_activation = nn.PReLU()
            self.fc2 = nn.Linear(64, 1)
        elif arch_style == "sum query":
            self.gene2query = nn.Linear(d_model, d_in)
            self.query_activation = nn.Sigmoid()
            self.fc1 = nn.Linear(d_in, 64)
            self.hidden_activation = nn.PReLU()
            self.fc2 = nn.Linear(64, 1)
        else:
            raise ValueError(f"unknown MVC decoder style {arch_style!r}")

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> dict[str, Tensor]:
        """``cell_emb`` (B, d_in); ``gene_embs`` (B, L, d) → dict(pred (B, L), zero_probs)."""
        query = self.query_activation(self.gene2query(gene_embs))  # (B, L, ·)
        if self.arch_style == "inner product":
            # <W q_g, c> = <q_g, Wᵀ c>: project the cell once instead of every gene.
            u = cell_emb @ self.W.weight  # (B, d)
            out = {"pred": torch.bmm(query, u.unsqueeze(2)).squeeze(2)}
            if self.explicit_zero_prob:
                uz = cell_emb @ self.W_zero_logit.weight  # (B, d)
                bias = (cell_emb @ self.W_zero_logit.bias).unsqueeze(1)  # (B, 1)
                logits = torch.bmm(query, uz.unsqueeze(2)).squeeze(2) + bias
                out["zero_probs"] = torch.sigmoid(logits)
            return out
        if self.arch_style == "concat query":
            c = cell_emb.unsqueeze(1).expand(-1, gene_embs.shape[1], -1)
            h = self.hidden_activation(self.fc1(torch.cat([c, query], dim=2)))
        else:
            h = self.hidden_activation(self.fc1(cell_emb.unsqueeze(1) + query))
        return {"pred": self.fc2(h).squeeze(2)}


def ecs_from_embeddings(cell_emb: Tensor, threshold: float) -> Tensor:
    """Elastic cell similarity: ``mean(1 - (relu(cos, diag=0) - threshold)²)`` over B×B."""
    e = F.normalize(cell_emb, p=2, dim=1)
    sim = e @ e.t()
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    sim = F.relu(sim.masked_fill(eye, 0.0))
    return torch.mean(1 - (sim - threshold) ** 2)


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` across ranks, keeping this rank's slice differentiable.

    ``all_gather`` returns tensors without autograd history, so the local slice is put
    back as the original tensor (as SimCSE / scGPT do); without distributed training
    this is the identity.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def cce_from_embeddings(emb_a: Tensor, emb_b: Tensor, temperature: float = 0.5) -> Tensor:
    """Contrastive cell embedding: cross-entropy of cosine(a_i, b_j)/T against i == j."""
    sim = F.cosine_similarity(emb_a.unsqueeze(1), emb_b.unsqueeze(0), dim=-1) / temperature
    labels = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(sim, labels)
