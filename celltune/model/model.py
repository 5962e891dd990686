"""``CellTransformer``: one model for scGPT's TransformerModel and TransformerGenerator.

The ``state_dict`` keys are exactly scGPT's, so published checkpoints load unchanged and
models saved here load in scGPT. Differences from the reference are deliberate and
documented on :class:`~celltune.model.config.ModelConfig`: fused attention (optional
attention dropout), per-cell domain-specific BatchNorm, an unseen-batch fallback at
inference, and padding-aware ``avg-pool`` / ``w-pool`` cell embeddings (scGPT averages
padded positions too, which makes embeddings depend on the chunk they were computed in).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli

from celltune.errors import InputError
from celltune.model.config import ModelConfig
from celltune.model.encoders import (
    DSBN_EPS,
    BatchLabelEncoder,
    CategoryValueEncoder,
    ContinuousValueEncoder,
    DomainSpecificBatchNorm1d,
    GeneEncoder,
)
from celltune.model.heads import (
    AdversarialDiscriminator,
    AffineExprDecoder,
    ClsDecoder,
    ExprDecoder,
    MVCDecoder,
    cce_from_embeddings,
    ecs_from_embeddings,
    gather_with_grad,
)
from celltune.model.layers import TransformerEncoder

logger = logging.getLogger(__name__)


class CellTransformer(nn.Module):
    """scGPT-architecture transformer over (gene, value) tokens of single cells."""

    def __init__(self, config: ModelConfig, vocab: Any = None) -> None:
        super().__init__()
        c = config
        c.validate()
        self.config = c
        self.vocab = vocab
        self.load_report: Any = None
        d = c.d_model

        self.encoder = GeneEncoder(c.ntoken, d, padding_idx=c.pad_id)
        if c.generator or c.input_emb_style == "continuous":
            self.value_encoder: nn.Module = ContinuousValueEncoder(d, c.dropout)
        elif c.input_emb_style == "category":
            pad = int(c.pad_value)
            padding_idx = pad if -c.n_input_bins <= pad < c.n_input_bins else None
            self.value_encoder = CategoryValueEncoder(c.n_input_bins, d, padding_idx)
        else:
            self.value_encoder = nn.Identity()
        if c.generator:
            self.pert_encoder = nn.Embedding(3, d, padding_idx=c.pert_pad_id)
        if c.use_batch_labels:
            self.batch_encoder = BatchLabelEncoder(c.num_batch_labels, d)
        if c.use_dsbn:
            self.dsbn = DomainSpecificBatchNorm1d(d, c.num_batch_labels, eps=DSBN_EPS)
        elif c.domain_spec_batchnorm == "batchnorm":
            self.bn = nn.BatchNorm1d(d, eps=DSBN_EPS)

        self.transformer_encoder = TransformerEncoder(
            c.nlayers,
            d,
            c.nhead,
            c.d_hid,
            c.dropout,
            c.attn_dropout,
            c.pre_norm,
            grad_checkpoint=c.grad_checkpoint,
        )
        if c.decoder == "affine":
            self.decoder: nn.Module = AffineExprDecoder(
                d,
                explicit_zero_prob=c.explicit_zero_prob,
                activation=c.decoder_activation,
                adaptive_bias=c.decoder_adaptive_bias,
            )
        else:
            self.decoder = ExprDecoder(d, c.explicit_zero_prob, c.use_batch_labels)
        self.cls_decoder = ClsDecoder(d, c.n_cls, nlayers=c.nlayers_cls)
        if c.do_mvc:
            self.mvc_decoder = MVCDecoder(
                d, c.mvc_decoder_style, c.explicit_zero_prob, c.use_batch_labels
            )
        if c.do_dab:
            self.grad_reverse_discriminator = AdversarialDiscriminator(d, c.num_batch_labels)
        # scGPT's only explicit initialisation (the <pad> row included).
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    # ----------------------------------------------------------------- helpers
    @property
    def needs_batch_labels(self) -> bool:
        """Whether the forward pass reads batch labels (batch encoder or DSBN)."""
        return self.config.use_batch_labels or self.config.use_dsbn

    def heads(self) -> list[str]:
        """Names of the heads this model has (for ``celltune model inspect``)."""
        c = self.config
        out = ["mlm (affine)" if c.decoder == "affine" else "mlm"]
        if c.explicit_zero_prob:
            out.append("mlm_zero_prob")
        if c.do_mvc:
            out.append(f"mvc ({c.mvc_decoder_style})")
        if c.do_dab:
            out.append("dab")
        out += ["cls", "cce", "ecs"]
        if c.generator:
            out.append("perturbation flags")
        return out

    def num_parameters(self) -> int:
        """Trainable parameter count (buffers excluded, as scGPT reports it)."""
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(
        self,
        gene_ids: Tensor,
        values: Tensor,
        pert_flags: Tensor | None,
        padding_mask: Tensor | None,
    ) -> Tensor:
        if not isinstance(gene_ids, Tensor) or gene_ids.dim() != 2:
            raise InputError(
                "gene_ids must be a 2-D (cells, tokens) integer tensor; got "
                f"{getattr(gene_ids, 'shape', type(gene_ids))}; add a batch dimension"
            )
        if gene_ids.dtype.is_floating_point or gene_ids.dtype == torch.bool:
            raise InputError(f"gene_ids must be integer token ids, got {gene_ids.dtype}")
        if not isinstance(values, Tensor) or values.shape != gene_ids.shape:
            raise InputError(
                f"values shape {tuple(getattr(values, 'shape', ()))} differs from gene_ids "
                f"shape {tuple(gene_ids.shape)}; pass one value per token"
            )
        if gene_ids.numel() and (gene_ids.min() < 0 or gene_ids.max() >= self.config.ntoken):
            raise InputError(
                f"gene ids must lie in [0, {self.config.ntoken}) (the model's vocabulary); got "
                f"{int(gene_ids.min())}..{int(gene_ids.max())}: map genes with the model's "
                "vocab.json"
            )
        if padding_mask is None:
            padding_mask = gene_ids == self.config.pad_id
        elif padding_mask.shape != gene_ids.shape:
            raise InputError(
                f"padding mask shape {tuple(padding_mask.shape)} differs from gene_ids shape "
                f"{tuple(gene_ids.shape)}"
            )
        elif padding_mask.dtype != torch.bool:
            padding_mask = padding_mask.bool()
        if self.config.generator:
            if pert_flags is None:
                raise InputError("the perturbation model needs pert_flags (0/1 per token)")
            if pert_flags.shape != gene_ids.shape:
                raise InputError(
                    f"pert_flags shape {tuple(pert_flags.shape)} differs from gene_ids shape "
                    f"{tuple(gene_ids.shape)}"
                )
            if pert_flags.numel() and (pert_flags.min() < 0 or pert_flags.max() > 2):
                raise InputError("pert_flags must be 0 (not perturbed), 1 (perturbed) or 2 (pad)")
        return padding_mask

    def _resolve_batch_labels(self, batch_labels: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
        """Return (labels, known): unknown labels only allowed at inference, with a warning."""
        c = self.config
        device = self.encoder.embedding.weight.device
        if batch_labels is None:
            if self.training:
                raise InputError(
                    "this model uses batch labels (batch encoder / DSBN): pass batch_labels "
                    "(one integer per cell) for training"
                )
            warnings.warn(
                "no batch_labels given to a model trained with batch labels; using the "
                "unseen-batch fallback (mean batch embedding, "
                f"{c.dsbn_unseen} DSBN statistics)",
                stacklevel=3,
            )
            labels = torch.zeros(n, dtype=torch.long, device=device)
            return labels, torch.zeros(n, dtype=torch.bool, device=device)
        batch_labels = torch.as_tensor(batch_labels, device=device).long().reshape(-1)
        if batch_labels.shape[0] != n:
            raise InputError(
                f"batch_labels has {batch_labels.shape[0]} entries for {n} cells; pass one per cell"
            )
        if bool((batch_labels < 0).any()):
            raise InputError("batch labels must be >= 0 (integer codes of the batch column)")
        known = batch_labels < c.num_batch_labels
        if not bool(known.all()):
            bad = sorted(set(batch_labels[~known].tolist()))
            if self.training:
                raise InputError(
                    f"batch label(s) {bad} >= the {c.num_batch_labels} batches the model was "
                    "built with; re-code the batch column to 0..n-1 or build the model with "
                    "num_batch_labels = number of batches"
                )
            warnings.warn(
                f"batch label(s) {bad} were not seen in training ({c.num_batch_labels} "
                f"batches); using the unseen-batch fallback ({c.dsbn_unseen} DSBN statistics, "
                "mean batch embedding)",
                stacklevel=3,
            )
        return torch.where(known, batch_labels, torch.zeros_like(batch_labels)), known

    # --------------------------------------------------------------- encoding
    def _encode(
        self,
        gene_ids: Tensor,
        values: Tensor,
        pert_flags: Tensor | None,
        padding_mask: Tensor,
        labels: Tensor | None,
        known: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Transformer output (B, L, d) and the gene-token embeddings (for MVC)."""
        c = self.config
        genes = self.encoder(gene_ids)
        if c.input_emb_style == "scaling" and not c.generator:
            x = genes * values.unsqueeze(2)
        else:
            x = genes + self.value_encoder(values)
        if c.generator:
            x = x + self.pert_encoder(pert_flags)
        if c.use_dsbn:
            dom = None
            if labels is not None and known is not None:
                dom = torch.where(known, labels, torch.full_like(labels, -1))
            x = self.dsbn(x, dom, mode=c.dsbn_mode, unseen=c.dsbn_unseen)
        elif c.domain_spec_batchnorm == "batchnorm":
            x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.transformer_encoder(x, padding_mask), genes

    def _cell_emb(self, h: Tensor, values: Tensor, padding_mask: Tensor) -> Tensor:
        style = self.config.cell_emb_style
        if style == "cls":
            return h[:, 0, :]
        keep = (~padding_mask).unsqueeze(2).to(h.dtype)
        if style == "avg-pool":
            return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        weighted = (h * (values.unsqueeze(2) * keep)).sum(1)
        return torch.nn.functional.normalize(weighted, p=2, dim=1)

    def forward(
        self,
        gene_ids: Tensor | None = None,
        values: Tensor | None = None,
        pert_flags: Tensor | None = None,
        padding_mask: Tensor | None = None,
        batch_labels: Tensor | None = None,
        *,
        CLS: bool = False,
        CCE: bool = False,
        MVC: bool = False,
        ECS: bool = False,
        DAB: bool | None = None,
        do_sample: bool = False,
        src: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        input_pert_flags: Tensor | None = None,
        mvc_gene_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Run the model; only the heads asked for are computed (MLM always, DAB if built).

        Accepts scGPT's names (``src``, ``src_key_padding_mask``, ``input_pert_flags``)
        and scGPT's positional order: for a non-generator model a bool third argument
        is the padding mask and the fourth the batch labels, as in
        ``TransformerModel.forward(src, values, src_key_padding_mask, batch_labels)``.

        ``mvc_gene_ids`` ((G,) or (B, G)): genes the GEPC/MVC head predicts from the cell
        embedding instead of the input tokens, e.g. every HVG, so that the embedding must
        also say which genes are *not* expressed (``mvc_output`` is then (B, G)).
        """
        c = self.config
        gene_ids = src if gene_ids is None else gene_ids
        padding_mask = src_key_padding_mask if padding_mask is None else padding_mask
        pert_flags = input_pert_flags if pert_flags is None else pert_flags
        if gene_ids is None or values is None:
            raise InputError("forward needs gene_ids (or src) and values")
        padding_mask, pert_flags, batch_labels = self._scgpt_positional(
            padding_mask, pert_flags, batch_labels
        )
        padding_mask = self._check_inputs(gene_ids, values, pert_flags, padding_mask)
        values = values.to(self.encoder.embedding.weight.dtype)

        labels = known = None
        if self.needs_batch_labels:
            labels, known = self._resolve_batch_labels(batch_labels, gene_ids.shape[0])

        h, genes = self._encode(gene_ids, values, pert_flags, padding_mask, labels, known)
        batch_emb = None
        if c.use_batch_labels:
            batch_emb = self.batch_encoder(labels, known)

        out = self._mlm_heads(h, values, batch_emb, do_sample)
        cell_emb = self._cell_emb(h, values, padding_mask)
        out["cell_emb"] = cell_emb
        if CLS:
            out["cls_output"] = self.cls_decoder(cell_emb)
        if CCE:
            h2, _ = self._encode(gene_ids, values, pert_flags, padding_mask, labels, known)
            emb_a, emb_b = cell_emb, self._cell_emb(h2, values, padding_mask)
            if self.training:
                emb_a, emb_b = gather_with_grad(emb_a), gather_with_grad(emb_b)
            out["loss_cce"] = cce_from_embeddings(emb_a, emb_b, temperature=0.5)
        if MVC:
            out.update(self._mvc_heads(cell_emb, batch_emb, genes, mvc_gene_ids, do_sample))
        if ECS:
            out["loss_ecs"] = ecs_from_embeddings(cell_emb, c.ecs_threshold)
        if c.do_dab and (DAB is None or DAB):
            out["dab_output"] = self.grad_reverse_discriminator(cell_emb)
        return out

    def _scgpt_positional(
        self,
        padding_mask: Tensor | None,
        pert_flags: Tensor | None,
        batch_labels: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(padding_mask, pert_flags, batch_labels) read in scGPT's positional order: for a
        non-generator model a bool third argument is the padding mask, the fourth the
        batch labels; anything else in that place is an error."""
        if self.config.generator or pert_flags is None:
            return padding_mask, pert_flags, batch_labels
        if pert_flags.dtype != torch.bool:
            raise InputError(
                "pert_flags given to a model without a perturbation encoder; pass the "
                "padding mask as padding_mask= (or build the model with generator=True)"
            )
        if batch_labels is None and padding_mask is not None:
            batch_labels = padding_mask
        return pert_flags, None, batch_labels

    def _mlm_heads(
        self, h: Tensor, values: Tensor, batch_emb: Tensor | None, do_sample: bool
    ) -> dict[str, Tensor]:
        """``mlm_output`` (sampled through the zero probabilities with ``do_sample``) and,
        with ``explicit_zero_prob``, ``mlm_zero_probs``."""
        c = self.config
        out: dict[str, Tensor] = {}
        # the affine (generator) decoder scales the input values; the MLP one sees the batch
        mlm = self.decoder(h, values) if c.decoder == "affine" else self.decoder(h, batch_emb)
        if c.explicit_zero_prob and do_sample:
            out["mlm_output"] = Bernoulli(probs=mlm["zero_probs"]).sample() * mlm["pred"]
        else:
            out["mlm_output"] = mlm["pred"]
        if c.explicit_zero_prob:
            out["mlm_zero_probs"] = mlm["zero_probs"]
        return out

    def _mvc_heads(
        self,
        cell_emb: Tensor,
        batch_emb: Tensor | None,
        genes: Tensor,
        mvc_gene_ids: Tensor | None,
        do_sample: bool,
    ) -> dict[str, Tensor]:
        """GEPC/MVC: ``mvc_output`` for the input tokens' genes (or ``mvc_gene_ids``) from
        the cell embedding, and ``mvc_zero_probs`` when the decoder gives them."""
        c = self.config
        if not c.do_mvc:
            raise InputError("MVC=True but the model has no MVC decoder; build it with do_mvc")
        out: dict[str, Tensor] = {}
        query_cell = cell_emb if batch_emb is None else torch.cat([cell_emb, batch_emb], 1)
        if mvc_gene_ids is not None:  # GEPC queries these genes, not the input tokens
            ids = mvc_gene_ids if mvc_gene_ids.dim() == 2 else mvc_gene_ids[None]
            genes = self.encoder(ids).expand(cell_emb.shape[0], -1, -1)
        mvc = self.mvc_decoder(query_cell, genes)
        if c.explicit_zero_prob and do_sample and "zero_probs" in mvc:
            out["mvc_output"] = Bernoulli(probs=mvc["zero_probs"]).sample() * mvc["pred"]
        else:
            out["mvc_output"] = mvc["pred"]
        if "zero_probs" in mvc:
            out["mvc_zero_probs"] = mvc["zero_probs"]
        return out

    @torch.no_grad()
    def embed(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor | None = None,
        batch_labels: Tensor | None = None,
        pert_flags: Tensor | None = None,
    ) -> Tensor:
        """Cell embeddings (B, d) in eval mode.

        Eval mode makes every cell independent of the others in its chunk (per-cell DSBN
        with running statistics, masked attention, padding-aware pooling), so the result
        does not depend on how cells are split into chunks.
        """
        was_training = self.training
        self.eval()
        try:
            padding_mask = self._check_inputs(gene_ids, values, pert_flags, padding_mask)
            values = values.to(self.encoder.embedding.weight.dtype)
            labels = known = None
            if self.needs_batch_labels:
                labels, known = self._resolve_batch_labels(batch_labels, gene_ids.shape[0])
            h, _ = self._encode(gene_ids, values, pert_flags, padding_mask, labels, known)
            return self._cell_emb(h, values, padding_mask)
        finally:
            self.train(was_training)
