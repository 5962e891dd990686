"""The perturbation-flag transformer: built from scratch or from a scGPT model, and its forward.

A ``--pretrained`` model brings its own sizes (``args.json``) and vocabulary; only the
encoder, value encoder and transformer weights are loaded (``PRETRAINED_PREFIXES``): the
perturbation decoder and flag encoder are new.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celltune.errors import InputError
from celltune.tasks.perturbation.config import PRETRAINED_PREFIXES, PerturbConfig

logger = logging.getLogger(__name__)


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(
        batch["gene_ids"],
        batch["values"],
        pert_flags=batch["pert_flags"],
        padding_mask=batch["padding_mask"],
    )
    pred = out["mlm_output"]
    return pred.squeeze(-1) if pred.dim() == 3 else pred


def build_model(
    cfg: PerturbConfig, genes: Sequence[str], pretrained: str | None
) -> tuple[torch.nn.Module, Any, np.ndarray, dict[str, Any]]:
    """Model, vocabulary, vocab id per gene, and a load report (for run.json)."""
    from celltune.data.vocab import GeneVocab
    from celltune.model.config import ModelConfig
    from celltune.model.model import CellTransformer

    info: dict[str, Any] = {}
    common = {"generator": True, "pert_pad_id": 2, "do_mvc": False, "explicit_zero_prob": False}
    if pretrained:
        from celltune.model.checkpoint import check_not_adapter, load_weights, read_state_dict

        pdir = Path(pretrained)
        check_not_adapter(pdir)
        if not (pdir / "vocab.json").is_file() or not (pdir / "args.json").is_file():
            raise InputError(
                f"--pretrained {pdir} is not a scGPT model directory (needs args.json, "
                "vocab.json and best_model.pt); download e.g. scGPT_human and pass its folder"
            )
        vocab = GeneVocab.from_file(pdir / "vocab.json")
        args = json.loads((pdir / "args.json").read_text())
        weights = next(
            (pdir / n for n in ("model.safetensors", "best_model.pt") if (pdir / n).is_file()), None
        )
        if weights is None:
            raise InputError(f"--pretrained {pdir} has no best_model.pt or model.safetensors")
        state = read_state_dict(weights)
        base = ModelConfig.from_args(args, state, vocab=vocab.token_to_id)
        mcfg = dataclasses.replace(
            base,
            **common,
            decoder=cfg.model.decoder,
            dropout=cfg.model.dropout,
            do_dab=False,
            use_batch_labels=False,
            domain_spec_batchnorm=False,
            num_batch_labels=0,
            input_emb_style="continuous",
        )
        model = CellTransformer(mcfg, vocab=vocab)
        report = load_weights(model, state, prefixes=list(PRETRAINED_PREFIXES))
        info["pretrained"] = str(pdir.resolve())
        info["pretrained_loaded"] = len(getattr(report, "loaded", []))
        logger.info(
            "loaded %d pretrained tensors (%s) from %s",
            info["pretrained_loaded"],
            ", ".join(PRETRAINED_PREFIXES),
            pdir,
        )
    else:
        vocab = GeneVocab.from_genes(list(genes))
        mcfg = ModelConfig(
            ntoken=len(vocab),
            pad_id=vocab.pad_id,
            d_model=cfg.model.d_model,
            nhead=cfg.model.nhead,
            d_hid=cfg.model.d_hid,
            nlayers=cfg.model.nlayers,
            dropout=cfg.model.dropout,
            pre_norm=cfg.model.pre_norm,
            decoder=cfg.model.decoder,
            input_emb_style="continuous",
            pad_value=0.0,
            **common,
        )
        model = CellTransformer(mcfg, vocab=vocab)
    from celltune.model.finetune import apply_finetune, trainable_summary

    apply_finetune(model, cfg.finetune, pretrained=bool(pretrained))
    info["finetune"] = {"mode": cfg.finetune.mode, "trainable": trainable_summary(model)}
    match = vocab.match_genes(list(genes))
    info["genes_in_vocab"] = int(match.n_matched)
    return model, vocab, np.asarray(match.ids, dtype=np.int64), info
