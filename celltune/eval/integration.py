"""scIB integration metrics for one or more embeddings, computed with ``scib-metrics``.

Every metric comes from the ``scib-metrics`` package (the JAX re-implementation of the
scIB benchmark, Luecken et al. 2022); this module only prepares the inputs (subsampling,
label filtering, one shared k-NN graph per embedding) and aggregates.

Metrics (all in [0, 1], higher is better):

- bio conservation: ``nmi`` / ``ari`` of clusters vs cell-type labels (Leiden with the
  resolution optimised for NMI by default, as scIB/scGPT do; ``clustering="kmeans"`` for
  k-means with k = number of labels), ``asw_celltype`` (silhouette of labels, rescaled),
  ``isolated_label`` (ASW-based isolated-label score), ``clisi`` (scaled cLISI);
- batch correction: ``asw_batch`` (batch silhouette within each label, 1 − |s|),
  ``ilisi`` (scaled iLISI), ``kbet`` (kBET acceptance rate on the 50-NN graph; scIB's
  per-label variant with ``kbet="per_label"``: 15-110 s per embedding on 500 cells here),
  ``graph_connectivity``;
- averages as the scGPT paper defines them (Cui et al. 2024, *Nat Methods*, Methods,
  "Batch-correction metrics"; reference code ``scgpt/utils/util.py::eval_scib_metrics``):
  ``avg_bio = mean(NMI, ARI, ASW_celltype)`` and ``avg_batch = mean(ASW_batch,
  graph_connectivity)``;
- scIB aggregates (Luecken et al. 2022; scib-metrics ``Benchmarker.get_results`` without
  min-max scaling): ``scib_bio`` = mean of the five bio metrics, ``scib_batch`` = mean of
  the four batch metrics, ``scib_total = 0.6·scib_bio + 0.4·scib_batch``. They are not
  min-max scaled across methods, so a row does not change when methods are added.

Cells whose label is missing or one of ``unknown_labels`` (e.g. ``"unknown"``) are left out
of every metric that needs labels (all but iLISI), because scoring them as one extra
"cell type" would reward mixing unrelated cells. iLISI uses all (subsampled) cells.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd

from celltune.errors import InputError

logger = logging.getLogger(__name__)

BIO_METRICS = ("nmi", "ari", "asw_celltype", "isolated_label", "clisi")
BATCH_METRICS = ("asw_batch", "ilisi", "kbet", "graph_connectivity")
AGGREGATES = ("avg_bio", "avg_batch", "scib_bio", "scib_batch", "scib_total")
METRIC_COLUMNS = BIO_METRICS + BATCH_METRICS + AGGREGATES
DEFAULT_UNKNOWN_LABELS = ("unknown", "Unknown", "nan", "NaN", "NA", "None", "")

# scib-metrics' Benchmarker neighbour counts: 15 for graph metrics, 50 for kBET, 90 for LISI.
_K_GRAPH, _K_KBET, _K_LISI = 15, 50, 90


def _import_scib_metrics() -> Any:
    """Import scib-metrics with JAX pinned to the CPU and its start-up chatter silenced."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("jax", "jax._src.xla_bridge", "absl", "numba", "pynndescent"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import scib_metrics
    return scib_metrics


def label_mask(
    labels: pd.Series, unknown_labels: Iterable[str] = DEFAULT_UNKNOWN_LABELS
) -> np.ndarray:
    """True for cells with a usable label (not missing and not in ``unknown_labels``)."""
    values = labels.astype(object)
    known = values.notna().to_numpy()
    bad = {str(u) for u in unknown_labels}
    known &= ~values.astype(str).str.strip().isin(bad).to_numpy()
    return known


def _check_inputs(
    adata: Any, embeddings: Mapping[str, str], batch_key: str, label_key: str
) -> None:
    if not embeddings:
        raise InputError("no embeddings given: pass e.g. {'pca': 'X_pca'}")
    for key, what in ((batch_key, "batch"), (label_key, "cell-type label")):
        if key not in adata.obs.columns:
            raise InputError(
                f"{what} column {key!r} is not in adata.obs (columns: "
                f"{', '.join(map(str, adata.obs.columns)) or 'none'}): pass an existing column"
            )
    for method, key in embeddings.items():
        if key not in adata.obsm:
            raise InputError(
                f"embedding {key!r} for method {method!r} is not in adata.obsm (keys: "
                f"{', '.join(adata.obsm.keys()) or 'none'}): compute it first"
            )
        X = np.asarray(adata.obsm[key])
        if X.ndim != 2 or X.shape[0] != adata.n_obs:
            raise InputError(f"obsm[{key!r}] must be a cells × dims matrix, got {X.shape}")
        if not np.isfinite(X).all():
            raise InputError(f"obsm[{key!r}] contains NaN/inf values: fix the embedding first")
    n_batches = adata.obs[batch_key].nunique(dropna=True)
    if n_batches < 2:
        raise InputError(
            f"batch column {batch_key!r} has {n_batches} batch(es): batch-correction metrics "
            "need at least 2; pass a column with several batches"
        )


def _subsample(n: int, max_cells: int | None, seed: int) -> np.ndarray:
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_cells, replace=False))


def _in_unit(name: str, value: float, tol: float = 1e-4) -> float:
    """Clip round-off just outside [0, 1]; warn about real excursions (left as is)."""
    if not np.isfinite(value):
        return float("nan")
    if -tol <= value < 0.0 or 1.0 < value <= 1.0 + tol:
        return float(min(max(value, 0.0), 1.0))
    if value < -tol or value > 1.0 + tol:
        logger.warning("metric %s = %.4f is outside [0, 1]", name, value)
    return float(value)


def _neighbors(X: np.ndarray, k: int, seed: int) -> Any:
    """Exact k-NN of every cell (self first) in scib-metrics' ``NeighborsResults`` form.

    scikit-learn's exact search replaces the Benchmarker's pynndescent: pynndescent's numba
    compilation alone took 78 s on a 2-core machine, exact search < 1 s at 10⁴ cells.
    ``seed`` is unused (exact search is deterministic); kept for a uniform signature.
    """
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    del seed
    k = int(min(k, X.shape[0] - 1))
    nn = NearestNeighbors(n_neighbors=k).fit(X)
    dist, ind = nn.kneighbors(X)
    return NeighborsResults(indices=ind, distances=dist)


def _safe(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one metric; a failure becomes NaN with a warning rather than losing the table."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except Exception as exc:
        logger.warning("metric %s failed (%s: %s); reported as NaN", name, type(exc).__name__, exc)
        return float("nan")


def compute_metrics(
    X: np.ndarray,
    batches: np.ndarray,
    labels: np.ndarray,
    known: np.ndarray,
    *,
    clustering: Literal["leiden", "kmeans"] = "leiden",
    kbet: Literal["per_label", "global"] = "global",
    seed: int = 0,
) -> dict[str, float]:
    """All scIB metrics of one embedding ``X`` (cells × dims); ``known`` marks labelled cells."""
    sm = _import_scib_metrics()
    X = np.asarray(X, dtype=np.float32)
    batches = np.asarray(batches).astype(str)
    out: dict[str, float] = {}

    # iLISI on every cell: it needs no labels.
    nn_all = _neighbors(X, _K_LISI, seed)
    out["ilisi"] = float(_safe("ilisi", sm.ilisi_knn, nn_all, batches))

    Xl, bl = X[known], batches[known]
    ll = np.asarray(labels)[known].astype(str)
    if len(np.unique(ll)) < 2:
        raise InputError(
            "fewer than 2 known cell-type labels among the evaluated cells: bio-conservation "
            "metrics need at least 2; check --label-key or raise max_cells"
        )
    nn = nn_all if known.all() else _neighbors(Xl, _K_LISI, seed)
    nn15 = nn.subset_neighbors(n=min(_K_GRAPH, nn.indices.shape[1]))
    nn50 = nn.subset_neighbors(n=min(_K_KBET, nn.indices.shape[1]))

    if clustering == "leiden":
        clus = _safe("nmi/ari", sm.nmi_ari_cluster_labels_leiden, nn15, ll, seed=seed)
    elif clustering == "kmeans":
        clus = _safe("nmi/ari", sm.nmi_ari_cluster_labels_kmeans, Xl, ll)
    else:
        raise InputError(f"clustering must be 'leiden' or 'kmeans', got {clustering!r}")
    clus = clus if isinstance(clus, dict) else {"nmi": clus, "ari": clus}
    out["nmi"], out["ari"] = float(clus["nmi"]), float(clus["ari"])
    out["asw_celltype"] = float(_safe("asw_celltype", sm.silhouette_label, Xl, ll))
    out["isolated_label"] = float(_safe("isolated_label", sm.isolated_labels, Xl, ll, bl))
    out["clisi"] = float(_safe("clisi", sm.clisi_knn, nn, ll))
    out["asw_batch"] = float(_safe("asw_batch", sm.silhouette_batch, Xl, ll, bl))
    if kbet == "per_label":
        kb = _safe("kbet", sm.kbet_per_label, nn50, bl, ll)
    else:
        kb = _safe("kbet", sm.kbet, nn50, bl)
        kb = kb[0] if isinstance(kb, tuple) else kb
    out["kbet"] = float(kb)
    out["graph_connectivity"] = float(_safe("graph_connectivity", sm.graph_connectivity, nn15, ll))

    out = {k: _in_unit(k, v) for k, v in out.items()}
    out.update(aggregate_scores(out))
    return out


def aggregate_scores(m: Mapping[str, float]) -> dict[str, float]:
    """scGPT's AvgBIO/AvgBATCH and scIB's unscaled bio/batch/total from individual metrics."""

    def mean(keys: Iterable[str]) -> float:
        vals = [m.get(k, float("nan")) for k in keys]
        return float(np.mean(vals)) if vals and all(np.isfinite(vals)) else float("nan")

    bio, batch = mean(BIO_METRICS), mean(BATCH_METRICS)
    return {
        "avg_bio": mean(("nmi", "ari", "asw_celltype")),
        "avg_batch": mean(("asw_batch", "graph_connectivity")),
        "scib_bio": bio,
        "scib_batch": batch,
        "scib_total": 0.6 * bio + 0.4 * batch,
    }


def scib_metrics_table(
    adata: Any,
    embeddings: Mapping[str, str],
    batch_key: str,
    label_key: str,
    *,
    max_cells: int | None = None,
    seed: int = 0,
    clustering: Literal["leiden", "kmeans"] = "leiden",
    kbet: Literal["per_label", "global"] = "global",
    unknown_labels: Iterable[str] = DEFAULT_UNKNOWN_LABELS,
    quiet: bool = False,
) -> pd.DataFrame:
    """One row per method (index = method name) with every scIB metric and aggregate.

    ``embeddings`` maps a method name to its ``obsm`` key. All methods are scored on the
    same (seeded) subsample of at most ``max_cells`` cells, so rows are comparable.
    Extra columns: ``n_cells``, ``n_labelled`` and ``seconds`` (metric time per method).
    """
    from tqdm.auto import tqdm

    _check_inputs(adata, embeddings, batch_key, label_key)
    idx = _subsample(adata.n_obs, max_cells, seed)
    obs = adata.obs.iloc[idx]
    batches = obs[batch_key].astype(str).to_numpy()
    if len(np.unique(batches)) < 2:
        raise InputError(f"the subsample of {len(idx)} cells holds one batch only: raise max_cells")
    known = label_mask(obs[label_key], unknown_labels)
    n_skipped = int((~known).sum())
    if n_skipped:
        logger.info(
            "%d of %d cells have a missing/unknown %r and are left out of label metrics",
            n_skipped,
            len(idx),
            label_key,
        )
    labels = obs[label_key].astype(str).to_numpy()
    rows = {}
    for method, key in tqdm(list(embeddings.items()), desc="scIB metrics", disable=quiet):
        t0 = time.perf_counter()
        X = np.asarray(adata.obsm[key])[idx]
        row: dict[str, float] = compute_metrics(
            X, batches, labels, known, clustering=clustering, kbet=kbet, seed=seed
        )
        row["n_cells"] = float(len(idx))
        row["n_labelled"] = float(known.sum())
        row["seconds"] = time.perf_counter() - t0
        logger.info(
            "%s: scib_bio %.3f scib_batch %.3f scib_total %.3f (%.1fs)",
            method,
            row["scib_bio"],
            row["scib_batch"],
            row["scib_total"],
            row["seconds"],
        )
        rows[method] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table[[*METRIC_COLUMNS, "n_cells", "n_labelled", "seconds"]]


def table_to_records(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}`` for ``metrics.json`` (NaN kept; the writer nulls it)."""
    return {str(m): {str(k): float(v) for k, v in row.items()} for m, row in table.iterrows()}
