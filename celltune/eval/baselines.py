"""Integration baselines: unintegrated PCA, Harmony and scVI embeddings.

Input convention (``celltune.data.preprocess.preprocess``): ``layers['counts']`` raw
counts, ``layers['X_normed']`` normalised + log1p (also ``X``), ``var['highly_variable']``.
Each function writes its embedding to ``obsm`` (``X_pca``, ``X_harmony``, ``X_scvi``) and
returns it, so callers can hand the same AnnData to ``scib_metrics_table``.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltune.errors import InputError

logger = logging.getLogger(__name__)


def _matrix(adata: Any, layer: str | None) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise InputError(
            f"layer {layer!r} is not in the AnnData (layers: "
            f"{', '.join(adata.layers.keys()) or 'none'}): run celltune preprocess first or "
            "pass layer=None to use X"
        )
    return adata.layers[layer]


def _batch_column(adata: Any, batch_key: str) -> np.ndarray:
    if batch_key not in adata.obs.columns:
        raise InputError(
            f"batch column {batch_key!r} is not in adata.obs (columns: "
            f"{', '.join(map(str, adata.obs.columns))}): pass an existing --batch-key"
        )
    batches = adata.obs[batch_key].astype(str).to_numpy()
    if len(np.unique(batches)) < 2:
        raise InputError(
            f"batch column {batch_key!r} has a single batch: there is nothing to integrate; "
            "pass a column with at least 2 batches"
        )
    return batches


def pca_embedding(
    adata: Any,
    n_comps: int = 50,
    layer: str | None = "X_normed",
    *,
    use_hvg: bool = True,
    seed: int = 0,
    key: str = "X_pca",
) -> np.ndarray:
    """Unintegrated baseline: PCA of the normalised+log1p (HVG) expression, as in scIB.

    Genes are centred but not scaled (scanpy's ``pca`` default); ``n_comps`` is capped at
    ``min(cells, genes) - 1``. Seeded (ARPACK start vector from ``seed``).
    """
    import scanpy as sc

    X = _matrix(adata, layer)
    if use_hvg and "highly_variable" in adata.var.columns:
        hvg = adata.var["highly_variable"].to_numpy(dtype=bool)
        if hvg.sum() >= 2:
            X = X[:, hvg]
    n_comps = int(min(n_comps, min(X.shape) - 1))
    if n_comps < 1:
        raise InputError(f"too few cells/genes for PCA ({X.shape}): need at least 2 of each")
    X = X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    emb = sc.pp.pca(X, n_comps=n_comps, random_state=seed, svd_solver="arpack")
    emb = np.asarray(emb, dtype=np.float32)
    adata.obsm[key] = emb
    return emb


def harmony_embedding(
    adata: Any,
    batch_key: str,
    *,
    basis: str = "X_pca",
    n_comps: int = 50,
    layer: str | None = "X_normed",
    max_iter: int = 10,
    seed: int = 0,
    key: str = "X_harmony",
) -> np.ndarray:
    """Harmony (harmonypy) on the unintegrated PCA; computes ``basis`` first if absent."""
    import harmonypy

    batches = _batch_column(adata, batch_key)
    if basis not in adata.obsm:
        pca_embedding(adata, n_comps=n_comps, layer=layer, seed=seed, key=basis)
    pcs = np.asarray(adata.obsm[basis], dtype=np.float64)
    meta = adata.obs[[batch_key]].astype(str).copy()
    meta[batch_key] = batches
    hlog = logging.getLogger("harmonypy")
    old = hlog.level
    hlog.setLevel(logging.WARNING)
    try:
        ho = harmonypy.run_harmony(
            pcs, meta, [batch_key], max_iter_harmony=max_iter, random_state=seed, verbose=False
        )
    finally:
        hlog.setLevel(old)
    Z = np.asarray(ho.Z_corr)
    if Z.shape[0] != adata.n_obs:  # harmonypy returns dims × cells
        Z = Z.T
    emb = np.ascontiguousarray(Z, dtype=np.float32)
    adata.obsm[key] = emb
    return emb


#: scvi-tools' and lightning's loggers (lightning.fabric sets its own level, so the
#: parent's is not enough).
_QUIET_LOGGERS = (
    "scvi",
    "lightning",
    "lightning.fabric",
    "lightning.pytorch",
    "lightning_fabric",
    "pytorch_lightning",
)


def scvi_embedding(
    adata: Any,
    batch_key: str,
    counts_layer: str | None = "counts",
    max_epochs: int | None = None,
    *,
    n_latent: int = 30,
    use_hvg: bool = True,
    seed: int = 0,
    max_cell_epochs: float = 1.0e5,
    accelerator: str = "auto",
    key: str = "X_scvi",
) -> tuple[np.ndarray | None, str]:
    """scVI latent space (scvi-tools) on raw counts, or ``(None, reason)`` when skipped.

    Skipped (never raised) when scvi-tools is not importable, or when ``cells × epochs``
    exceeds ``max_cell_epochs`` on a CPU (measured: ~4 s per 100 cell-epochs on the
    shared 2-core CI machine, i.e. 20 epochs of 1,556 cells take over 5 minutes),
    so an integration run still finishes and reports why scVI is missing.
    ``max_epochs=None`` uses scvi-tools' rule ``min(400, round(400 · 20000 / n_cells))``.
    Returns ``(embedding, "")`` on success.
    """
    batches = _batch_column(adata, batch_key)
    counts = _matrix(adata, counts_layer)
    import importlib.util

    import torch

    if importlib.util.find_spec("scvi") is None:
        reason = "scvi-tools is not installed"
        logger.warning("scVI baseline skipped: %s; pip install 'celltune[scvi]'", reason)
        return None, reason
    n = adata.n_obs
    epochs = max_epochs if max_epochs is not None else min(400, round(400 * 20000 / n))
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if not on_gpu and n * epochs > max_cell_epochs:
        reason = (
            f"too slow on CPU: {n} cells × {epochs} epochs > max_cell_epochs="
            f"{max_cell_epochs:.0f}; pass fewer max_epochs or run on a GPU"
        )
        logger.warning("scVI baseline skipped: %s", reason)
        return None, reason
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import scvi
    except Exception as exc:
        reason = f"scvi-tools is not importable ({type(exc).__name__}: {exc})"
        logger.warning("scVI baseline skipped: %s", reason)
        return None, reason

    import anndata as ad

    genes = np.ones(adata.n_vars, dtype=bool)
    if use_hvg and "highly_variable" in adata.var.columns:
        genes = adata.var["highly_variable"].to_numpy(dtype=bool)
    X = counts[:, genes]
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.astype(np.float32)
    work = ad.AnnData(X=X, obs={"batch": batches})
    work.obs_names = adata.obs_names
    t0 = time.perf_counter()
    for name in _QUIET_LOGGERS:  # before the seed, whose setter logs "Seed set to 0" twice
        logging.getLogger(name).setLevel(logging.WARNING)
    scvi.settings.seed = seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(work, batch_key="batch")
        model = scvi.model.SCVI(work, n_latent=n_latent)
        model.train(
            max_epochs=int(epochs),
            accelerator="gpu" if on_gpu else "cpu",
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=False,
        )
        emb = np.asarray(model.get_latent_representation(), dtype=np.float32)
    logger.info("scVI: %d epochs on %d cells in %.1fs", epochs, n, time.perf_counter() - t0)
    adata.obsm[key] = emb
    return emb, ""
