"""The per-epoch embedding health check of an integration run (issue 16's guardrail).

Each validation pass keeps the cell embeddings, batch labels and dense (binned) expression
of a fixed sample of validation cells (the first ``max_cells`` of the validation loader,
whose order does not change between epochs) and scores them with
:func:`celltune.train.embedding_health.embedding_health`. The PCA of the same cells'
expression is the reference, logged once.

No warning is raised from the participation ratio alone: on PBMCs the best runs measured
have ``val/pr`` ≈ 1.05, because one biological axis (monocytes vs lymphocytes) holds
94% of the embedding's variance while neighbourhoods keep improving (``val/preserve``
rising). A ratio near 1 *with* ``val/preserve`` falling is what collapse looks like.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from celltune.train.embedding_health import embedding_health, reference_health

logger = logging.getLogger("celltune.tasks.integration")


class HealthSample:
    """Collects one validation pass's sample; :meth:`scores` scores and resets it."""

    def __init__(self, max_cells: int) -> None:
        self.max_cells = int(max_cells)
        self._emb: list[np.ndarray] = []
        self._batches: list[np.ndarray] = []
        self._expr: list[np.ndarray] = []
        self._n = 0
        self._reference_logged = False

    def add(self, cell_emb: Any, batch: Mapping[str, Any], expression: Any) -> None:
        """Keep this mini-batch's cells while the sample has room."""
        room = self.max_cells - self._n
        if room <= 0:
            return
        emb = cell_emb.detach().float().cpu().numpy()[:room]
        self._emb.append(emb)
        self._batches.append(batch["batch_labels"].cpu().numpy()[:room])
        self._expr.append(expression.detach().float().cpu().numpy()[:room])
        self._n += emb.shape[0]

    def scores(self, has_batches: bool) -> dict[str, float]:
        """``val/pr``, ``val/mixing``, ``val/preserve`` of the sample (empty when off or
        the sample is too small to score)."""
        if self._n < 10:
            self._reset()
            return {}
        emb = np.concatenate(self._emb)
        batches = np.concatenate(self._batches) if has_batches else None
        # files of other gene sets (pretraining on several files) have other widths:
        # neighbourhoods are then not compared with an expression PCA
        widths = {e.shape[1] for e in self._expr}
        expr = np.concatenate(self._expr) if len(widths) == 1 else None
        self._reset()
        if not self._reference_logged and expr is not None:
            ref = reference_health(batches, expr)
            logger.info(
                "embedding health on %d validation cells, scored each epoch; the expression "
                "PCA of the same cells has pr=%.3g%s",
                emb.shape[0],
                ref["pr"],
                f", mixing={ref['mixing']:.3g}" if "mixing" in ref else "",
            )
            self._reference_logged = True
        out = embedding_health(emb, batches, expr)
        return {f"val/{k}": v for k, v in out.items()}

    def _reset(self) -> None:
        self._emb, self._batches, self._expr, self._n = [], [], [], 0
