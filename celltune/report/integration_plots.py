"""UMAPs of integration embeddings (one panel per method) and a metrics bar chart.

Figures are drawn with matplotlib's Agg backend (no display needed) and written
atomically through ``celltune.files.atomic_path``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from celltune.errors import InputError
from celltune.files import atomic_path

logger = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def compute_umaps(
    adata: Any,
    embeddings: Mapping[str, str],
    *,
    n_neighbors: int = 15,
    max_cells: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """2-D UMAP per method (umap-learn), all on the same seeded cell subsample.

    umap-learn is called directly rather than through ``sc.pp.neighbors`` + ``sc.tl.umap``:
    scanpy 1.11's neighbour path for 8,192 cells or more calls
    ``csr_array.getnnz``, which SciPy 1.17 removed, so larger datasets got no plots.

    Returns ``(cell_index, {method: (n, 2) coordinates})``.
    """
    import warnings

    import umap

    for method, key in embeddings.items():
        if key not in adata.obsm:
            raise InputError(
                f"embedding {key!r} for {method!r} is not in adata.obsm "
                f"(keys: {', '.join(adata.obsm.keys())}): compute it first"
            )
    idx = np.arange(adata.n_obs)
    if max_cells is not None and adata.n_obs > max_cells:
        idx = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
    coords = {}
    for method, key in embeddings.items():
        emb = np.asarray(adata.obsm[key], dtype=np.float32)[idx]
        reducer = umap.UMAP(
            n_neighbors=min(n_neighbors, idx.size - 1), min_dist=0.5, random_state=seed
        )  # scanpy's defaults (min_dist 0.5), seeded
        with warnings.catch_warnings():  # "n_jobs overridden ... by setting random_state"
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            coords[method] = np.asarray(reducer.fit_transform(emb), dtype=np.float32)
    return idx, coords


def _scatter_panels(
    coords: Mapping[str, np.ndarray], values: np.ndarray, title: str, path: Path, dpi: int
) -> Path:
    plt = _pyplot()
    cats = pd.Categorical(values)
    n = len(coords)
    ncols = min(n, 2)  # at most two panels a row: readable at a report's full width
    nrows = -(-n // ncols)
    width = 4.2 * ncols + 2.2
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
    colors = np.array([cmap(i % cmap.N) for i in range(len(cats.categories))])
    order = np.random.default_rng(0).permutation(len(values))  # no batch drawn on top
    for ax, (method, xy) in zip(axes.flat[:n], coords.items(), strict=True):
        ax.scatter(
            xy[order, 0],
            xy[order, 1],
            c=colors[cats.codes[order]],
            s=3,
            linewidths=0,
            rasterized=True,
        )
        ax.set_title(method)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=colors[i], label=str(c))
        for i, c in enumerate(cats.categories)
    ]
    fig.legend(handles=handles, loc="center right", title=title, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / width, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_umaps(
    adata: Any,
    embeddings: Mapping[str, str],
    out_dir: str | Path,
    *,
    batch_key: str,
    label_key: str | None = None,
    max_cells: int | None = 20000,
    seed: int = 0,
    dpi: int = 110,
    prefix: str = "umap",
) -> dict[str, Path]:
    """Write ``{prefix}_batch.png`` (and ``{prefix}_celltype.png``): one panel per method,
    two a row.

    Returns ``{"batch": path, "celltype": path}`` for the figures written.
    """
    for key in (batch_key, label_key):
        if key is not None and key not in adata.obs.columns:
            raise InputError(
                f"column {key!r} is not in adata.obs (columns: "
                f"{', '.join(map(str, adata.obs.columns))}): pass an existing column"
            )
    idx, coords = compute_umaps(adata, embeddings, max_cells=max_cells, seed=seed)
    out = Path(out_dir)
    paths = {
        "batch": _scatter_panels(
            coords,
            adata.obs[batch_key].astype(str).to_numpy()[idx],
            batch_key,
            out / f"{prefix}_batch.png",
            dpi,
        )
    }
    if label_key is not None:
        paths["celltype"] = _scatter_panels(
            coords,
            adata.obs[label_key].astype(str).to_numpy()[idx],
            label_key,
            out / f"{prefix}_celltype.png",
            dpi,
        )
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def plot_metrics(
    table: pd.DataFrame,
    path: str | Path,
    metrics: Sequence[str] = (
        "nmi",
        "ari",
        "asw_celltype",
        "isolated_label",
        "clisi",
        "asw_batch",
        "ilisi",
        "kbet",
        "graph_connectivity",
        "avg_bio",
        "avg_batch",
    ),
    dpi: int = 110,
) -> Path:
    """Grouped bar chart: one group per metric, one bar per method (rows of ``table``)."""
    plt = _pyplot()
    cols = [m for m in metrics if m in table.columns]
    if not cols or table.empty:
        raise InputError("metrics table is empty: compute scib_metrics_table first")
    n_m = len(table)
    width = 0.8 / n_m
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cols) + 2), 3.6))
    x = np.arange(len(cols))
    for i, (method, row) in enumerate(table.iterrows()):
        ax.bar(
            x + (i - (n_m - 1) / 2) * width,
            row[cols].astype(float).to_numpy(),
            width,
            label=str(method),
        )
    ax.set_xticks(x, cols, rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (higher is better)")
    ax.legend(fontsize=8, frameon=False, ncol=min(n_m, 4))
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
