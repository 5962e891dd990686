"""Transformer encoder built on ``F.scaled_dot_product_attention``.

Why not ``nn.TransformerEncoderLayer``: its training path materialises the full
(batch, heads, seq, seq) score, softmax and dropout tensors (~1.5 GB per layer at
64 cells × 1,201 genes), which is what makes scGPT slow and memory-hungry on CPU.
SDPA dispatches to a fused kernel (flash on CPU/GPU, memory-efficient on GPU) that never
stores the score matrix. State-dict names equal ``nn.TransformerEncoderLayer``'s
(``self_attn.in_proj_weight``, ``linear1``, ``norm1``, ...) so scGPT weights load as is.

The packed [q; k; v] projection is an ``nn.Linear`` (``self_attn.in_proj``) so that
``peft`` LoRA can target it like any other linear layer; two state-dict hooks keep the
saved and loaded names PyTorch's/scGPT's ``in_proj_weight`` / ``in_proj_bias``.

On CPU the fused kernel only runs without attention dropout (PyTorch falls back to the
unfused math kernel for ``dropout_p > 0``), hence the separate ``attn_dropout`` option.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# module attribute name -> state-dict name (PyTorch's nn.MultiheadAttention / scGPT)
_SAVED_NAMES = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}


def _save_scgpt_names(module: nn.Module, state_dict: dict, prefix: str, _meta: Any) -> None:
    """State-dict hook: ``in_proj.weight`` -> ``in_proj_weight``, in place and in order.

    The hook runs right after this module's subtree was written, so its keys are the last
    ones: re-inserting them all keeps scGPT's key order.
    """
    own_keys = [k for k in state_dict if k.startswith(prefix)]
    for key in own_keys:
        value = state_dict.pop(key)
        short = key[len(prefix) :]
        state_dict[prefix + _SAVED_NAMES.get(short, short)] = value


def _load_scgpt_names(state_dict: dict, prefix: str, *_args: Any) -> None:
    """Load pre-hook: ``in_proj_weight`` -> ``in_proj.weight`` before the keys are matched."""
    for own, saved in _SAVED_NAMES.items():
        if prefix + saved in state_dict:
            state_dict[prefix + own] = state_dict.pop(prefix + saved)


class SelfAttention(nn.Module):
    """Multi-head self-attention with packed [q; k; v] projection (PyTorch layout)."""

    def __init__(self, d_model: int, nhead: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.attn_dropout = attn_dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        self._register_state_dict_hook(_save_scgpt_names)
        self._register_load_state_dict_pre_hook(_load_scgpt_names)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """``x`` (B, L, d); ``attn_mask`` (B, 1, 1, L) bool, True = may attend, or None."""
        B, L, d = x.shape
        qkv = self.in_proj(x)
        q, k, v = qkv.view(B, L, 3, self.nhead, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, L, d))


class EncoderLayer(nn.Module):
    """Post-norm (scGPT/PyTorch default) or pre-norm transformer layer, ReLU feed-forward.

    ``pre_norm=True`` is the standard pre-LN layer (``x + f(norm(x))``, as PyTorch's
    ``norm_first``); scGPT's flash-attention "pre" variant differs (it feeds the
    normalised tensor into the residual) and is not reproduced.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        d_hid: int,
        dropout: float,
        attn_dropout: float = 0.0,
        pre_norm: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, nhead, attn_dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        if self.pre_norm:
            x = x + self.dropout1(self.self_attn(self.norm1(x), attn_mask))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, attn_mask)))
        return self.norm2(x + self._ff(x))


class TransformerEncoder(nn.Module):
    """A stack of :class:`EncoderLayer` (keys ``transformer_encoder.layers.N.*``)."""

    def __init__(
        self,
        nlayers: int,
        d_model: int,
        nhead: int,
        d_hid: int,
        dropout: float,
        attn_dropout: float = 0.0,
        pre_norm: bool = False,
        grad_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.grad_checkpoint = grad_checkpoint
        self.layers = nn.ModuleList(
            [
                EncoderLayer(d_model, nhead, d_hid, dropout, attn_dropout, pre_norm)
                for _ in range(nlayers)
            ]
        )

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``padding_mask`` (B, L) bool, True = padding (ignored as a key)."""
        attn_mask = None
        if padding_mask is not None and bool(padding_mask.any()):
            attn_mask = (~padding_mask)[:, None, None, :]
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                # keep only each layer's input; recompute its activations in backward
                # (same dropout masks: the RNG state is restored)
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        return x
