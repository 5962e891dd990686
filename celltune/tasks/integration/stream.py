"""The integration run's data streamed from a file on disk (``--stream``).

The in-memory path keeps three CSR layers of the data; here the expression matrix stays
on disk: what is held for every cell is its batch code (1 byte), and rows are read,
binned and tokenised a window of chunks at a time by
:class:`celltune.data.streaming.StreamingCellDataset`. What differs, and why:

- HVGs are chosen on a seeded, batch-stratified sample of ``data.stream_sample_cells``
  cells (50,000 by default; all cells when the file is smaller), since choosing them on
  every cell would need the whole matrix in memory.
- The validation split is drawn from the batch codes alone (10% of every batch).
- Embeddings are written mini-batch by mini-batch into an on-disk array; the resulting
  ``integrated.h5ad`` holds ``obs`` (all columns of the input), ``var`` and
  ``obsm['X_celltune']`` but no ``X`` (the expression stays in the input file).
- ``processed`` (what the evaluation scores) is an in-memory sample of at most
  ``eval.eval_cells`` (default: ``data.stream_sample_cells``) cells, normalised and
  log1p-transformed like the in-memory path, restricted to the HVGs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.data.source import sample_rows
from celltune.errors import InputError
from celltune.tasks.integration.checks import check_batch_counts
from celltune.tasks.integration.config import EMBEDDING_KEY, SPLIT_KEY
from celltune.tasks.integration.embed import EMBEDDING_FILE, embed_into, memmap
from celltune.tasks.integration.inputs import Genes, Outputs, RunInputs, source_fingerprint
from celltune.tasks.integration.train import preprocess_config

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from torch import nn

    from celltune.data.source import StoreSource

logger = logging.getLogger("celltune.tasks.integration")


class StreamedInputs(RunInputs):
    """Batch codes in memory, rows from disk; see the module docstring."""

    source: StoreSource
    streamed = True
    embed_on_every_rank = False  # rank 0 embeds and writes

    def check(self) -> list[str]:
        from celltune.data.validate import check_source_names

        d, src = self.cfg.data, self.source
        assert d.batch_key is not None
        check_source_names(src)  # what the in-memory path checks (check_integration_input)
        codes_raw, cats_raw = src.obs_codes(d.batch_key, None, "integration (--batch-key)")
        if d.label_key is not None:
            src.obs_codes(d.label_key, None, "evaluation (--label-key)")
        if src.n_obs < 20:
            raise InputError(
                f"only {src.n_obs} cells: integration fine-tuning needs at least 20 "
                "(10% are held out for validation)"
            )
        self.rows = np.arange(src.n_obs, dtype=np.int64)  # the file rows of the run
        if d.max_cells is not None and d.max_cells < src.n_obs:
            self.rows = sample_rows(src.n_obs, d.max_cells, self.cfg.train.seed, codes_raw)
            logger.info("subsampled %d of %d cells (data.max_cells)", self.rows.size, src.n_obs)
        self.codes, batch_cats = _compact_categories(codes_raw, cats_raw, self.rows)
        self.batch_cats = batch_cats
        n_per = np.bincount(self.codes[self.rows], minlength=len(batch_cats))
        check_batch_counts(pd.Series(n_per, index=batch_cats), self.cfg)
        return batch_cats

    def _file_genes(self) -> pd.Index:
        """Gene names of the file's columns (``var_names`` or a var column)."""
        col = self.cfg.data.gene_column
        if col is None:
            return pd.Index(self.source.var_names().astype(str))
        return pd.Index(self.source.var_column(col).astype(str).to_numpy())

    def choose_genes(self, pretrained: nn.Module | None, batch_cats: list[str]) -> Genes:
        from celltune.data.preprocess import preprocess
        from celltune.data.vocab import GeneVocab

        d, seed = self.cfg.data, self.cfg.train.seed
        file_genes = self._file_genes()
        self.col_idx: np.ndarray | None = None
        n_matched = None
        if pretrained is not None:
            vocab = pretrained.vocab
            match = vocab.match_genes(list(file_genes))  # logs the count
            n_matched = int(match.n_matched)
            self.col_idx = np.flatnonzero(np.asarray(match.matched, dtype=bool))
        pos = sample_rows(self.rows.size, d.stream_sample_cells, seed, self.codes[self.rows])
        sample = self.source.to_anndata(self.rows[pos], obs_keys=[d.batch_key])
        sample.var["_col"] = np.arange(sample.n_vars)
        if d.gene_column is not None:
            sample.var[d.gene_column] = file_genes.to_numpy()
        if self.col_idx is not None:
            sample = sample[:, self.col_idx].copy()
        pp_cfg = preprocess_config(self.cfg, len(batch_cats), sample.n_vars)
        # the source already read data.layer into X
        pp = preprocess(sample, dataclasses.replace(pp_cfg, layer=None), quiet=self.cfg.train.quiet)
        self.hvg_cols = np.asarray(pp.var["_col"], dtype=np.int64)  # file column of each HVG
        self.empty = pp[:0].copy()  # what a rank other than 0 returns
        genes = list(file_genes[self.hvg_cols])
        logger.info(
            "streaming %s: %s cells; %d HVGs chosen on a %s-cell sample",
            self.source.path.name,
            f"{self.rows.size:,}",
            len(genes),
            f"{sample.n_obs:,}",
        )
        if pretrained is None:
            vocab = GeneVocab.from_genes(genes)
        gene_ids = np.asarray(vocab.match_genes(genes).ids, dtype=np.int64)
        return Genes(genes, vocab, gene_ids, pp_cfg, n_matched)

    def batch_names(self) -> np.ndarray:
        # By batch name, as in memory: the same cells are held out for the same seed.
        return np.asarray(self.batch_cats, dtype=object)[self.codes[self.rows]]

    def _dataset(self, genes: Genes, rows: np.ndarray | None, **kw: Any) -> Any:
        from celltune.data.streaming import StreamingCellDataset

        d = self.cfg.data
        return StreamingCellDataset(
            self.source,
            genes.gene_ids,
            rows=rows,
            var_subset=self.hvg_cols,
            batch_key=d.batch_key,
            batch_categories=self.batch_cats,
            chunk_size=d.chunk_size,
            buffer_chunks=d.buffer_chunks,
            n_bins=d.n_bins,
            seed=self.cfg.train.seed,
            **kw,
        )

    def _loader_kw(self) -> dict[str, Any]:
        from celltune.train import distributed as dist_utils

        tc = self.cfg.train
        device = tc.resolve_device(dist_utils.local_rank())
        return {"num_workers": tc.num_workers, "pin_memory": tc.resolve_pin_memory(device)}

    def loaders(
        self,
        genes: Genes,
        batch_cats: list[str],
        split: tuple[np.ndarray, np.ndarray],
        collators: tuple[Any, Any, Any],
    ) -> tuple[Iterable[Any], Iterable[Any]]:
        tc = self.cfg.train
        train_coll, val_coll, self.embed_coll = collators
        self.genes = genes
        train_ds = self._dataset(
            genes,
            self.rows[split[0]],
            batch_size=tc.batch_size,
            shuffle=True,
            group_by_batch=self.cfg.model.dsbn,
        )
        # Every rank scores all validation cells (the same numbers on every rank).
        val_ds = self._dataset(genes, self.rows[split[1]], **self._eval_kw())
        kw = self._loader_kw()
        return train_ds.loader(train_coll, **kw), val_ds.loader(val_coll, **kw)

    def _eval_kw(self) -> dict[str, Any]:
        tc = self.cfg.train
        return {
            "batch_size": tc.eval_batch_size or tc.batch_size,
            "shuffle": False,
            "group_by_batch": False,
            "num_replicas": 1,
            "rank": 0,
        }

    def fingerprint(self, vocab: Any) -> dict[str, Any]:
        return source_fingerprint(self.source, vocab)

    @property
    def _whole_file(self) -> bool:
        return self.rows.size == self.source.n_obs

    def embed(self, model: nn.Module, device: torch.device, out_dir: Any) -> np.ndarray:
        """Embed every run cell into ``out_dir/embedding.npy`` (memory: one mini-batch)."""
        emb_rows = None if self._whole_file else self.rows
        emb_ds = self._dataset(self.genes, emb_rows, **self._eval_kw())
        d_model = model.config.d_model  # type: ignore[attr-defined]
        emb = memmap(Path(out_dir) / EMBEDDING_FILE, self.rows.size, d_model)
        position_of = None if emb_rows is None else (lambda idx: np.searchsorted(emb_rows, idx))
        embed_into(
            emb,
            model,
            emb_ds.loader(self.embed_coll, **self._loader_kw()),
            position_of=position_of,
            device=device,
            quiet=self.cfg.train.quiet,
        )
        emb.flush()
        return emb

    def outputs(self, emb: np.ndarray, genes: Genes, split: np.ndarray) -> Outputs:
        """obs + embedding (X stays in the input file); an in-memory evaluation sample."""
        import anndata

        obs = self.source.obs_frame(None if self._whole_file else self.rows).copy()
        obs[SPLIT_KEY] = pd.Categorical(split, categories=["train", "valid"])
        var = pd.DataFrame(index=self.source.var_names().astype(str))
        var["celltune_hvg"] = False
        var.iloc[self.hvg_cols, var.columns.get_loc("celltune_hvg")] = True
        result_ad = anndata.AnnData(obs=obs, var=var)
        result_ad.obsm[EMBEDDING_KEY] = np.asarray(emb)

        d = self.cfg.data
        eval_n = self.cfg.eval.eval_cells or d.stream_sample_cells
        epos = sample_rows(self.rows.size, eval_n, self.cfg.train.seed, self.codes[self.rows])
        processed = self._normalised_sample(self.rows[epos], genes.pp_cfg)
        processed.obs[SPLIT_KEY] = pd.Categorical(split[epos], categories=["train", "valid"])
        processed.obsm[EMBEDDING_KEY] = np.asarray(emb[epos])
        if processed.n_obs < self.rows.size:
            logger.info(
                "evaluation sample: %s of %s cells", f"{processed.n_obs:,}", f"{self.rows.size:,}"
            )
        return Outputs(result_ad, processed, {"input": str(self.source.path)})

    def _normalised_sample(self, rows: np.ndarray, pp_cfg: Any) -> AnnData:
        """An in-memory sample for evaluation: normalise + log1p over the run's genes (as
        the in-memory path), binned, restricted to the HVG columns."""
        from celltune.data.preprocess import preprocess

        d = self.cfg.data
        obs_keys = [d.batch_key] + ([d.label_key] if d.label_key else [])
        ad = self.source.to_anndata(rows, obs_keys=obs_keys)
        hvg_pos = self.hvg_cols
        if self.col_idx is not None:
            ad = ad[:, self.col_idx].copy()
            hvg_pos = np.searchsorted(self.col_idx, self.hvg_cols)
        # Normalise over all of the run's genes, then keep the HVGs (the HVG sample first
        # dropped genes with < filter_gene_by_counts counts: a negligible change of totals).
        keep_cfg = dataclasses.replace(
            pp_cfg, layer=None, n_hvg=0, filter_gene_by_counts=None, filter_cell_by_counts=None
        )
        pp = preprocess(ad, keep_cfg, quiet=True)
        return pp[:, hvg_pos].copy()

    def placeholder(self) -> AnnData:
        return self.empty.copy()

    def cleanup(self, out_dir: Any) -> None:
        (Path(out_dir) / EMBEDDING_FILE).unlink(missing_ok=True)


def _compact_categories(
    codes: np.ndarray, cats: list[Any], rows: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Drop categories no selected cell has (as the in-memory path does); recode."""
    sub = codes[rows].astype(np.int64)
    present = np.unique(sub)
    kept = [str(cats[i]) for i in present]
    remap = np.full(len(cats), -1, dtype=np.int64)
    remap[present] = np.arange(present.size)
    return remap[codes.astype(np.int64)], kept


__all__ = ["StreamedInputs"]
