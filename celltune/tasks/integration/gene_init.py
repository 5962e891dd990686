"""``model.gene_init=pca``: gene embeddings initialised from the data's own PCA.

Why: from scratch, the model's embedding holds less cell-type structure than a PCA of the
very binned values it reads (Kang 2,000 cells: scib_bio 0.57 vs 0.73, issue 16). A cell's
average-pooled token embedding starts near the mean of its expressed genes' embeddings;
with each gene's embedding set to its row of the principal axes of the binned training
cells (all HVGs, zeros included), that mean starts as a PCA-like projection of the cell
instead of a random one, and training (DAB, DSBN, GEPC) refines it from there.
Measured in docs/integration-recipe.md (round 4): it helps on some seeds, not reliably,
so it is off by default. Under DDP each rank reads its own cells; DDP then broadcasts
rank 0's weights, so every rank starts from the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from celltune.errors import InputError

logger = logging.getLogger("celltune.tasks.integration")


def collect_dense_values(
    loader: Iterable[Any], max_cells: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_cells`` rows of the collator's dense binned values (cells × HVGs) and
    the HVGs' vocabulary ids; needs ``objective.gepc_genes=all`` (dense targets)."""
    rows: list[torch.Tensor] = []
    ids = None
    n = 0
    for batch in loader:
        if "all_values" not in batch:
            break
        rows.append(batch["all_values"].float())
        ids = batch["all_gene_ids"]  # (G,): the same HVGs in every mini-batch
        n += rows[-1].shape[0]
        if n >= max_cells:
            break
    if not rows or ids is None:
        raise InputError(
            "model.gene_init=pca reads the dense values of objective.gepc_genes=all (the "
            "from-scratch recipe's); set --set objective.gepc_genes=all or model.gene_init=random"
        )
    return torch.cat(rows)[:max_cells], ids.long()


@torch.no_grad()
def pca_gene_init(model: nn.Module, loader: Iterable[Any], max_cells: int = 2048) -> int:
    """Set the HVGs' rows of ``model.encoder.embedding`` to their loadings on the top
    ``d_model`` principal axes of the binned training cells; returns the cells used."""
    X, ids = collect_dense_values(loader, max_cells)
    X = X - X.mean(0, keepdim=True)
    emb = model.encoder.embedding.weight  # type: ignore[union-attr]
    d = emb.shape[1]
    k = min(d, X.shape[0] - 1, X.shape[1])
    _, s, vt = torch.linalg.svd(X, full_matrices=False)
    load = vt[:k].t() * s[:k] / s[0]  # genes × k, weighted by each axis' singular value
    new = torch.zeros(ids.numel(), d, dtype=emb.dtype)
    new[:, :k] = load.to(emb.dtype)
    # the encoder's LayerNorm rescales each row, so a gene's direction is what counts
    emb[ids.to(emb.device)] = new.to(emb.device) * emb.std()
    logger.info(
        "gene embeddings initialised from the PCA of %d training cells (%d axes)", X.shape[0], k
    )
    return int(X.shape[0])
