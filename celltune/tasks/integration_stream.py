"""Integration fine-tuning and embedding streamed from an on-disk ``.h5ad`` (``--stream``).

The in-memory path (:func:`celltune.tasks.integration.integrate`) loads the file and keeps
three CSR layers of it; its memory grows with the data. Here the expression matrix stays
on disk: what is held for every cell is its batch code (1 byte), and rows are read, binned
and tokenised a window of chunks at a time by
:class:`celltune.data.streaming.StreamingCellDataset`. Everything else is the same code as
the in-memory path (model, objective, training loop, tokenisation, model directory), so a
cell gets the same tokens either way.

What differs, and why:

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
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.errors import InputError
from celltune.tasks.config import dump_config
from celltune.tasks.integration import (
    EMBEDDING_KEY,
    SPLIT_KEY,
    IntegrationConfig,
    IntegrationResult,
    _write_model_dir,
    check_batch_counts,
    collators,
    embed_into,
    embedding_batch_categories,
    embedding_collator,
    load_embedding_model,
    load_pretrained,
    open_run_dir,
    preprocess_config,
    resolve_config,
    resolve_embed_device,
    stratified_split,
    task_record,
    train_integration_model,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from celltune.data.streaming import H5adSource

logger = logging.getLogger(__name__)

#: Embeddings of a streamed run are written here first (an on-disk ``.npy``), then copied
#: into ``integrated.h5ad``.
EMBEDDING_FILE = "embedding.npy"


# ----------------------------------------------------------------------------- helpers
def _file_genes(src: H5adSource, gene_column: str | None) -> pd.Index:
    """Gene names of the file's columns (``var_names`` or a var column)."""
    if gene_column is None:
        return pd.Index(src.var_names().astype(str))
    return pd.Index(src.var_column(gene_column).astype(str).to_numpy())


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


def _obs_frame(path: Path, rows: np.ndarray | None) -> pd.DataFrame:
    """The input's ``obs`` for ``rows`` (all when None), read with anndata's reader."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        obs = read_elem(f["obs"])
    return obs if rows is None else obs.iloc[rows]


def _memmap(path: Path, n: int, d: int) -> np.ndarray:
    """A zero-filled float32 ``.npy`` array on disk (``n × d``)."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))


def _position_of(rows: np.ndarray | None) -> Any:
    """Map the file rows a streamed mini-batch reports to positions in ``rows``."""
    if rows is None:
        return None
    return lambda idx: np.searchsorted(rows, idx)


def _normalised_sample(
    path: Path,
    rows: np.ndarray,
    cfg: IntegrationConfig,
    pp_cfg: Any,
    col_idx: np.ndarray | None,
    hvg_cols: np.ndarray,
    obs_keys: list[str],
) -> AnnData:
    """An in-memory sample for evaluation: normalise + log1p over the run's genes (as the
    in-memory path), binned, restricted to the HVG columns."""
    from celltune.data.preprocess import preprocess
    from celltune.data.streaming import read_cells

    ad = read_cells(path, rows, layer=cfg.data.layer, obs_keys=obs_keys)
    if col_idx is not None:
        ad = ad[:, col_idx].copy()
    # Normalise over all of the run's genes, then keep the HVGs (the HVG sample first
    # dropped genes with < filter_gene_by_counts counts: a negligible change of totals).
    keep_cfg = dataclasses.replace(
        pp_cfg, layer=None, n_hvg=0, filter_gene_by_counts=None, filter_cell_by_counts=None
    )
    pp = preprocess(ad, keep_cfg, quiet=True)
    return pp[:, hvg_cols].copy()


# ----------------------------------------------------------------------------- integrate
def integrate_file(
    path: str | Path,
    config: IntegrationConfig | Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
) -> IntegrationResult:
    """:func:`~celltune.tasks.integration.integrate` for files larger than memory.

    Reads ``path`` in row chunks (CSR or dense ``X`` / ``data.layer``); memory is set by
    ``data.chunk_size × data.buffer_chunks`` rows, the HVG sample and the model, not by the
    number of cells. Same outputs as the in-memory path (see the module docstring for
    ``integrated.h5ad`` and ``processed``).
    """
    from celltune.data.preprocess import preprocess
    from celltune.data.streaming import (
        H5adSource,
        StreamingCellDataset,
        read_cells,
        sample_rows,
    )
    from celltune.data.vocab import GeneVocab
    from celltune.train import distributed as dist_utils

    t_start = time.perf_counter()
    dist_utils.init_distributed()
    cfg = resolve_config(config)
    d, tc = cfg.data, cfg.train
    seed, quiet = tc.seed, tc.quiet
    assert d.batch_key is not None
    path = Path(path)

    # 0. what the file holds: batch codes only, checked before anything is written -------
    src = H5adSource(path, d.layer)
    n_obs = src.n_obs
    codes_raw, cats_raw = src.obs_codes(d.batch_key, None, "integration (--batch-key)")
    if d.label_key is not None:
        src.obs_codes(d.label_key, None, "evaluation (--label-key)")
    if n_obs < 20:
        raise InputError(
            f"only {n_obs} cells: integration fine-tuning needs at least 20 "
            "(10% are held out for validation)"
        )
    rows_all = np.arange(n_obs, dtype=np.int64)
    if d.max_cells is not None and d.max_cells < n_obs:
        rows_all = sample_rows(n_obs, d.max_cells, seed, codes_raw)
        logger.info("subsampled %d of %d cells (data.max_cells)", rows_all.size, n_obs)
    codes, batch_cats = _compact_categories(codes_raw, cats_raw, rows_all)
    counts = pd.Series(np.bincount(codes[rows_all], minlength=len(batch_cats)), index=batch_cats)
    check_batch_counts(counts, cfg)

    out, tmp_dir = open_run_dir(cfg, out_dir, resume)

    # 1. genes: pretrained vocabulary, HVGs on a sample ----------------------------------
    pretrained = load_pretrained(cfg)
    file_genes = _file_genes(src, d.gene_column)
    col_idx: np.ndarray | None = None
    n_matched = None
    if pretrained is not None:
        vocab = pretrained.vocab
        match = vocab.match_genes(list(file_genes))  # logs the count
        n_matched = int(match.n_matched)
        col_idx = np.flatnonzero(np.asarray(match.matched, dtype=bool))
    if out_dir is not None and dist_utils.is_main_process():
        dump_config(cfg, out / "config.yaml", header="celltune integrate: resolved configuration")

    pos = sample_rows(rows_all.size, d.stream_sample_cells, seed, codes[rows_all])
    sample_rows_file = rows_all[pos]
    sample = read_cells(path, sample_rows_file, layer=d.layer, obs_keys=[d.batch_key])
    sample.var["_col"] = np.arange(sample.n_vars)
    if d.gene_column is not None:
        sample.var[d.gene_column] = file_genes.to_numpy()
    if col_idx is not None:
        sample = sample[:, col_idx].copy()
    n_genes_in = sample.n_vars
    pp_cfg = preprocess_config(cfg, len(batch_cats), n_genes_in)
    # read_cells already put data.layer into X
    pp_sample = preprocess(sample, dataclasses.replace(pp_cfg, layer=None), quiet=quiet)
    hvg_cols = np.asarray(pp_sample.var["_col"], dtype=np.int64)  # file column of each HVG
    genes = list(file_genes[hvg_cols])
    logger.info(
        "streaming %s: %s cells; %d HVGs chosen on a %s-cell sample",
        path.name,
        f"{rows_all.size:,}",
        len(genes),
        f"{sample.n_obs:,}",
    )
    del sample
    if pretrained is None:
        vocab = GeneVocab.from_genes(genes)
    gene_ids = np.asarray(vocab.match_genes(genes).ids, dtype=np.int64)

    # 2. split, streamed datasets ------------------------------------------------------
    # By batch name, as in memory: the same cells are held out for the same seed.
    names = np.asarray(batch_cats, dtype=object)[codes[rows_all]]
    train_pos, val_pos = stratified_split(names, d.valid_fraction, seed)
    del names
    train_rows, val_rows = rows_all[train_pos], rows_all[val_pos]
    logger.info(
        "%s cells: %s train / %s validation, %d batches, %d genes",
        f"{rows_all.size:,}",
        f"{train_rows.size:,}",
        f"{val_rows.size:,}",
        len(batch_cats),
        len(genes),
    )
    common: dict[str, Any] = {
        "layer": d.layer,
        "var_subset": hvg_cols,
        "batch_key": d.batch_key,
        "batch_categories": batch_cats,
        "chunk_size": d.chunk_size,
        "buffer_chunks": d.buffer_chunks,
        "n_bins": d.n_bins,
        "seed": seed,
    }
    eval_bs = tc.eval_batch_size or tc.batch_size
    train_ds = StreamingCellDataset(
        path,
        gene_ids,
        rows=train_rows,
        batch_size=tc.batch_size,
        shuffle=True,
        group_by_batch=cfg.model.dsbn,
        **common,
    )
    # Every rank scores all validation cells (the same numbers on every rank).
    val_ds = StreamingCellDataset(
        path,
        gene_ids,
        rows=val_rows,
        batch_size=eval_bs,
        shuffle=False,
        group_by_batch=False,
        num_replicas=1,
        rank=0,
        **common,
    )
    train_coll, val_coll, embed_coll = collators(cfg, vocab, gene_ids)
    device = tc.resolve_device(dist_utils.local_rank())
    loader_kw = {"num_workers": tc.num_workers, "pin_memory": tc.resolve_pin_memory(device)}
    train_loader = train_ds.loader(train_coll, **loader_kw)
    val_loader = val_ds.loader(val_coll, **loader_kw)

    # 3. training (the same function as in memory) --------------------------------------
    trainer, history, model, train_seconds = train_integration_model(
        cfg, vocab, len(batch_cats), pretrained, train_loader, val_loader, out, resume
    )

    task_info = task_record(cfg, batch_cats, pp_cfg)
    task_info["stream"] = True
    files: dict[str, Path] = {}
    if not dist_utils.is_main_process():  # rank 0 embeds and writes
        if tmp_dir is not None:
            tmp_dir.cleanup()
        return IntegrationResult(
            adata=pp_sample[:0].copy(),
            processed=pp_sample[:0].copy(),
            model=model,
            vocab=vocab,
            config=cfg,
            history=pd.DataFrame(history.records),
            best_epoch=history.best_epoch,
            stopped_early=history.stopped_early,
            out_dir=None if out_dir is None else out,
            train_seconds=train_seconds,
            n_genes_matched=n_matched,
        )

    # 4. embed every cell into an on-disk array ------------------------------------------
    emb_rows = None if rows_all.size == n_obs else rows_all  # None: the whole file
    emb_ds = StreamingCellDataset(
        path,
        gene_ids,
        rows=emb_rows,
        batch_size=eval_bs,
        shuffle=False,
        group_by_batch=False,
        num_replicas=1,
        rank=0,
        **common,
    )
    emb = _memmap(out / EMBEDDING_FILE, rows_all.size, model.config.d_model)  # type: ignore[attr-defined]
    embed_into(
        emb,
        model,
        emb_ds.loader(embed_coll, **loader_kw),
        position_of=_position_of(emb_rows),
        device=trainer.device,
        quiet=quiet,
    )
    emb.flush()

    # 5. outputs: obs + embedding (X stays in the input file), evaluation sample ---------
    import anndata

    from celltune.data import io

    split = np.full(rows_all.size, "train", dtype=object)
    split[val_pos] = "valid"
    obs = _obs_frame(path, emb_rows).copy()
    obs[SPLIT_KEY] = pd.Categorical(split, categories=["train", "valid"])
    var = pd.DataFrame(index=src.var_names().astype(str))
    var["celltune_hvg"] = False
    var.iloc[hvg_cols, var.columns.get_loc("celltune_hvg")] = True
    result_ad = anndata.AnnData(obs=obs, var=var)
    result_ad.obsm[EMBEDDING_KEY] = np.asarray(emb)
    result_ad.uns["celltune"] = {
        "integration": {
            **task_info,
            "input": str(path),
            "best_epoch": history.best_epoch,
            "best_val_mse": history.best_metric,
            "epochs_run": len(history),
            "train_seconds": round(train_seconds, 2),
            "cell_keys_of": "obs_names",
        }
    }

    eval_n = cfg.eval.eval_cells or d.stream_sample_cells
    epos = sample_rows(rows_all.size, eval_n, seed, codes[rows_all])
    obs_keys = [d.batch_key] + ([d.label_key] if d.label_key else [])
    processed = _normalised_sample(
        path, rows_all[epos], cfg, pp_cfg, col_idx, _hvg_positions(col_idx, hvg_cols), obs_keys
    )
    processed.obs[SPLIT_KEY] = pd.Categorical(split[epos], categories=["train", "valid"])
    processed.obsm[EMBEDDING_KEY] = np.asarray(emb[epos])
    if processed.n_obs < rows_all.size:
        logger.info(
            "evaluation sample: %s of %s cells", f"{processed.n_obs:,}", f"{rows_all.size:,}"
        )

    if out_dir is not None:
        files["model"] = out / "model"
        _write_model_dir(model, vocab, files["model"], task_info)
        files["integrated"] = out / "integrated.h5ad"
        io.write_h5ad(result_ad, files["integrated"])
        files["history"] = trainer.history_path
        files["config"] = out / "config.yaml"
        files["checkpoint"] = trainer.checkpoint_path
    del emb
    (out / EMBEDDING_FILE).unlink(missing_ok=True)
    if tmp_dir is not None:
        tmp_dir.cleanup()
    logger.info("integration (streamed) finished in %.1f s", time.perf_counter() - t_start)
    return IntegrationResult(
        adata=result_ad,
        processed=processed,
        model=model,
        vocab=vocab,
        config=cfg,
        history=pd.DataFrame(history.records),
        best_epoch=history.best_epoch,
        stopped_early=history.stopped_early,
        out_dir=None if out_dir is None else out,
        files=files,
        train_seconds=train_seconds,
        n_genes_matched=n_matched,
    )


def _hvg_positions(col_idx: np.ndarray | None, hvg_cols: np.ndarray) -> np.ndarray:
    """Positions of the HVG file columns within the ``col_idx`` subset (or the file)."""
    if col_idx is None:
        return hvg_cols
    return np.searchsorted(col_idx, hvg_cols)


# ----------------------------------------------------------------------------- embed
def embed_file(
    path: str | Path,
    model_dir: str | Path,
    out_path: str | Path,
    *,
    batch_key: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    key: str = EMBEDDING_KEY,
    layer: str | None = None,
    gene_column: str | None = None,
    max_seq_len: int | None = None,
    chunk_size: int = 1024,
    buffer_chunks: int = 8,
    quiet: bool = False,
) -> Path:
    """:func:`~celltune.tasks.integration.embed` streamed from disk, written to ``out_path``.

    The output ``.h5ad`` holds the input's ``obs`` and ``var`` and ``obsm[key]``, but no
    ``X`` (the expression stays in the input file). Tokenisation, batch handling and the
    embedding of each cell are those of ``embed`` (tested to match).
    """
    import anndata

    from celltune.data import io
    from celltune.data.streaming import H5adSource, StreamingCellDataset

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1 (got {batch_size})")
    path, mdir, out_path = Path(path), Path(model_dir), Path(out_path)
    dev = resolve_embed_device(device)
    src = H5adSource(path, layer)
    model, task = load_embedding_model(mdir)
    vocab, mc = model.vocab, model.config
    if gene_column is None:
        gene_column = task.get("gene_column")
        if gene_column is not None and gene_column not in src.file["var"]:
            gene_column = None
    match = vocab.match_genes(list(_file_genes(src, gene_column)))  # logs the count
    matched = np.flatnonzero(np.asarray(match.matched, dtype=bool))
    gene_ids = np.asarray(match.ids, dtype=np.int64)[matched]
    present = None
    if batch_key is not None:
        _, cats = src.obs_codes(batch_key, None, "batch-aware embedding (--batch-key)")
        present = [str(c) for c in cats]
    batch_cats = embedding_batch_categories(present, task, mc, mdir)
    ds = StreamingCellDataset(
        path,
        gene_ids,
        layer=layer,
        var_subset=matched,
        batch_key=batch_key,
        batch_categories=batch_cats,
        batch_size=batch_size,
        chunk_size=chunk_size,
        buffer_chunks=buffer_chunks,
        shuffle=False,
        group_by_batch=False,
        n_bins=int(task.get("n_bins", getattr(mc, "n_input_bins", 51) or 51)),
        seed=int(task.get("seed", 0)),
        num_replicas=1,
        rank=0,
    )
    zero_shot = not task
    collator = embedding_collator(model, task, gene_ids, max_seq_len=max_seq_len)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="celltune-embed-", dir=out_path.parent) as tmp:
        emb = _memmap(Path(tmp) / EMBEDDING_FILE, src.n_obs, mc.d_model)
        embed_into(emb, model, ds.loader(collator), device=dev, quiet=quiet)
        emb.flush()
        var = pd.DataFrame(index=src.var_names().astype(str))
        out = anndata.AnnData(obs=_obs_frame(path, None), var=var)
        out.obsm[key] = np.asarray(emb)
        out.uns["celltune"] = {
            "embed": {
                "model_dir": str(mdir),
                "input": str(path),
                "key": key,
                "n_genes_matched": int(match.n_matched),
                "batch_key": batch_key,
                "zero_shot_tokenisation": zero_shot,
                "stream": True,
            }
        }
        io.write_h5ad(out, out_path)
        del emb
    return out_path


__all__ = ["EMBEDDING_FILE", "embed_file", "integrate_file"]
