"""The integration run's data held in memory (an AnnData): SPEC §1 on the whole matrix."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.tasks.integration.checks import (
    _gene_names,
    _subsample_cells,
    check_integration_input,
)
from celltune.tasks.integration.config import EMBEDDING_KEY, SPLIT_KEY
from celltune.tasks.integration.embed import embed_cells
from celltune.tasks.integration.inputs import Genes, Outputs, RunInputs
from celltune.tasks.integration.train import preprocess_config

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from torch import nn

    from celltune.data.source import AnnDataSource

logger = logging.getLogger("celltune.tasks.integration")


class InMemoryInputs(RunInputs):
    """Preprocess the AnnData whole, train from ``CellDataset`` with the batch-aware (by
    default length-bucketed) sampler, embed every cell, keep all input genes."""

    source: AnnDataSource

    @property
    def adata(self) -> AnnData:
        return self.source.adata

    def check(self) -> list[str]:
        return check_integration_input(self.adata, self.cfg)

    def choose_genes(self, pretrained: nn.Module | None, batch_cats: list[str]) -> Genes:
        from celltune.data.preprocess import preprocess
        from celltune.data.vocab import GeneVocab

        d = self.cfg.data
        assert d.batch_key is not None
        n_matched = None
        ad_in = self.adata
        if pretrained is not None:
            vocab = pretrained.vocab
            match = vocab.match_genes(list(_gene_names(ad_in, d.gene_column)))  # logs the count
            n_matched = int(match.n_matched)
            ad_in = ad_in[:, np.asarray(match.matched, dtype=bool)]
        if d.max_cells is not None:
            ad_in = _subsample_cells(ad_in, d.max_cells, d.batch_key, self.cfg.train.seed)
        pp_cfg = preprocess_config(self.cfg, len(batch_cats), ad_in.n_vars)
        self.pp = preprocess(ad_in, pp_cfg, quiet=self.cfg.train.quiet)
        genes = list(_gene_names(self.pp, d.gene_column))
        if pretrained is None:
            vocab = GeneVocab.from_genes(genes)
        gene_ids = np.asarray(vocab.match_genes(genes).ids, dtype=np.int64)
        return Genes(genes, vocab, gene_ids, pp_cfg, n_matched)

    def batch_names(self) -> np.ndarray:
        return np.asarray(self.pp.obs[self.cfg.data.batch_key])

    def loaders(
        self,
        genes: Genes,
        batch_cats: list[str],
        split: tuple[np.ndarray, np.ndarray],
        collators: tuple[Any, Any, Any],
    ) -> tuple[Iterable[Any], Iterable[Any]]:
        from celltune.data.dataset import CellDataset
        from celltune.train import make_loader

        train_idx, val_idx = split
        train_coll, val_coll, self.embed_coll = collators
        kw: dict[str, Any] = {
            "layer": "X_binned",
            "batch_key": self.cfg.data.batch_key,
            "batch_categories": batch_cats,
        }
        train_ds = CellDataset(self.pp[train_idx].copy(), genes.gene_ids, **kw)
        val_ds = CellDataset(self.pp[val_idx].copy(), genes.gene_ids, **kw)
        self.all_ds = CellDataset(self.pp, genes.gene_ids, **kw)
        tc = self.cfg.train
        if self.cfg.model.dsbn:
            sampler = self._batch_sampler(train_ds)
            train_loader = make_loader(train_ds, tc, collate_fn=train_coll, batch_sampler=sampler)
        else:
            train_loader = make_loader(train_ds, tc, collate_fn=train_coll, shuffle=True)
        return train_loader, make_loader(val_ds, tc, collate_fn=val_coll, eval=True)

    def _batch_sampler(self, train_ds: Any) -> Any:
        """DSBN needs one batch per mini-batch; with ``tokens.length_buckets`` cells of
        similar length are grouped too (fewer padded tokens, same cells per epoch)."""
        from celltune.data.sampler import BatchAwareSampler, LengthBucketedSampler
        from celltune.train import distributed as dist_utils

        tc = self.cfg.train
        kwargs: dict[str, Any] = {
            "shuffle": True,
            "seed": tc.seed,
            "num_replicas": dist_utils.world_size(),
            "rank": dist_utils.rank(),
        }
        if self.cfg.tokens.length_buckets:
            lengths = np.diff(train_ds.X.indptr)
            return LengthBucketedSampler(train_ds.batch_labels, lengths, tc.batch_size, **kwargs)
        return BatchAwareSampler(train_ds.batch_labels, tc.batch_size, **kwargs)

    def fingerprint(self, vocab: Any) -> dict[str, Any]:
        from celltune.train import input_fingerprint

        return input_fingerprint(self.adata, vocab)

    def embed(self, model: nn.Module, device: torch.device, out_dir: Any) -> np.ndarray:
        tc = self.cfg.train
        return embed_cells(
            model,
            self.all_ds,
            self.embed_coll,
            batch_size=tc.eval_batch_size or tc.batch_size,
            device=device,
            quiet=tc.quiet,
        )

    def outputs(self, emb: np.ndarray, genes: Genes, split: np.ndarray) -> Outputs:
        pp = self.pp
        pp.obs[SPLIT_KEY] = pd.Categorical(split, categories=["train", "valid"])
        pp.obsm[EMBEDDING_KEY] = emb
        # All input genes, the cells that survived filtering / subsampling, in pp's order.
        result_ad = self.adata[pp.obs_names].copy()
        result_ad.obsm[EMBEDDING_KEY] = emb
        result_ad.obs[SPLIT_KEY] = pd.Categorical(split, categories=["train", "valid"])
        all_genes = _gene_names(result_ad, self.cfg.data.gene_column)
        result_ad.var["celltune_hvg"] = all_genes.isin(set(genes.names))
        return Outputs(result_ad, pp, {})


__all__ = ["InMemoryInputs"]
