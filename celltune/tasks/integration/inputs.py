"""What the integration workflow asks of its data, whichever source it comes from.

:func:`celltune.tasks.integration.workflow.integrate` is one sequence of steps (check,
run directory, genes, split, loaders, training, embedding, outputs). The steps that
depend on where the cells live are the methods of :class:`RunInputs`:

- :class:`~celltune.tasks.integration.memory.InMemoryInputs` (an
  :class:`~celltune.data.source.AnnDataSource`): SPEC §1 preprocessing of the whole
  matrix, ``CellDataset`` + the batch-aware (length-bucketed) sampler;
- :class:`~celltune.tasks.integration.stream.StreamedInputs` (a
  :class:`~celltune.data.source.StoreSource`, ``--stream``): HVGs on a seeded sample,
  ``StreamingCellDataset`` windows, embeddings into an on-disk array.

Both tokenise a cell identically (binning and masks are keyed on the cell's name).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from torch import nn

    from celltune.data.source import CellSource
    from celltune.tasks.integration.config import IntegrationConfig


@dataclass
class Genes:
    """The genes a run trains on: names (HVGs), vocabulary and its ids, SPEC §1 settings."""

    names: list[str]
    vocab: Any
    gene_ids: np.ndarray
    pp_cfg: Any
    n_matched: int | None  # genes matched to a pretrained vocabulary (None: no pretrained)


@dataclass
class Outputs:
    """``adata`` (all input genes + embedding) and ``processed`` (what evaluation scores)."""

    adata: AnnData
    processed: AnnData
    extra_record: dict[str, Any]


class RunInputs(abc.ABC):
    """The source-dependent steps of one integration run (called in this order)."""

    #: True when the file is streamed (``--stream``); recorded in ``celltune_task.json``.
    streamed: bool = False
    #: Whether every DDP rank embeds (in memory) or rank 0 alone (streamed).
    embed_on_every_rank: bool = True

    def __init__(self, source: CellSource, cfg: IntegrationConfig) -> None:
        self.source = source
        self.cfg = cfg

    @abc.abstractmethod
    def check(self) -> list[str]:
        """Validate the input against the config (nothing written yet); batch categories."""

    @abc.abstractmethod
    def choose_genes(self, pretrained: nn.Module | None, batch_cats: list[str]) -> Genes:
        """Match the pretrained vocabulary, select the run's cells, choose the HVGs."""

    @abc.abstractmethod
    def batch_names(self) -> np.ndarray:
        """The batch name of every cell of the run, in run order (the split draws on it)."""

    @abc.abstractmethod
    def loaders(
        self,
        genes: Genes,
        batch_cats: list[str],
        split: tuple[np.ndarray, np.ndarray],
        collators: tuple[Any, Any, Any],
    ) -> tuple[Iterable[Any], Iterable[Any]]:
        """The training and validation loaders for the split (run positions)."""

    @abc.abstractmethod
    def fingerprint(self, vocab: Any) -> dict[str, Any]:
        """What the checkpoint records of the input, so a resume on other data is refused."""

    @abc.abstractmethod
    def embed(self, model: nn.Module, device: torch.device, out_dir: Any) -> np.ndarray:
        """Every run cell's embedding (run order; may be an on-disk array)."""

    @abc.abstractmethod
    def outputs(self, emb: np.ndarray, genes: Genes, split: np.ndarray) -> Outputs:
        """The result AnnData and the evaluation AnnData (``split``: train/valid per cell)."""

    def cleanup(self, out_dir: Any) -> None:  # noqa: B027 - nothing to remove in memory
        """Remove scratch files once the outputs are written."""

    def placeholder(self) -> AnnData:
        """An empty AnnData of the run's genes, for ranks that do not embed."""
        raise NotImplementedError("every rank embeds in-memory data")

    def n_cells(self) -> int:
        """Cells in the run."""
        return int(self.batch_names().size)


def source_fingerprint(source: CellSource, vocab: Any, chunk_rows: int = 65536) -> dict[str, Any]:
    """:func:`celltune.train.input_fingerprint` of a source read name chunk by name chunk
    (the same fields as for an AnnData: shape, name hashes, file and size, vocabulary)."""
    from types import SimpleNamespace

    from celltune.train import input_fingerprint

    def names() -> Iterable[str]:
        for a in range(0, source.n_obs, chunk_rows):
            yield from source.obs_names(a, min(a + chunk_rows, source.n_obs))

    view = SimpleNamespace(
        n_obs=source.n_obs,
        n_vars=source.n_vars,
        obs_names=names(),
        var_names=source.var_names(),
        filename=getattr(source, "path", None),
    )
    return input_fingerprint(view, vocab)


__all__ = ["Genes", "Outputs", "RunInputs", "source_fingerprint"]
