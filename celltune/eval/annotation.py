"""Annotation metrics and baselines, one table for every method.

Metrics are computed on the query cells whose true label the reference knows; cells with
no label (NaN) and cells whose label the reference never had are counted and reported
separately (they are not errors of the model). Predicted ``unknown`` counts as wrong.

Baselines (all fitted on the reference only, Harmony on the joint PCA): logistic
regression on the reference PCA, kNN on PCA, kNN on Harmony, CellTypist.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celltune.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

BASELINES = ("logreg_pca", "knn_pca", "knn_harmony", "celltypist")


@dataclass
class AnnotationScores:
    """Accuracy / macro-F1 on scored cells, per-class table, confusion matrix, exclusions."""

    accuracy: float
    macro_f1: float
    n_scored: int
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    n_unlabelled: int = 0
    query_only: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_unknown: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-able headline figures."""
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "n_scored": self.n_scored,
            "n_unlabelled": self.n_unlabelled,
            "n_predicted_unknown": self.n_unknown,
            "query_only_labels": self.query_only,
        }


def _is_missing(values: pd.Series) -> np.ndarray:
    s = values.astype(str).str.strip()
    return values.isna().to_numpy() | s.isin(["", "nan", "NaN"]).to_numpy()


def score_annotation(
    true: Sequence[Any], pred: Sequence[Any], reference_classes: Sequence[str]
) -> AnnotationScores:
    """Score predictions against true labels, over the classes the reference has."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    t = pd.Series(list(true), dtype=object)
    p = pd.Series(list(pred), dtype=object).astype(str).to_numpy()
    classes = sorted(map(str, reference_classes))
    missing = _is_missing(t)
    t_str = t.astype(str).to_numpy()
    known = ~missing & np.isin(t_str, classes)
    only = ~missing & ~known
    query_only: dict[str, dict[str, Any]] = {}
    for lab in sorted(set(t_str[only])):
        sel = only & (t_str == lab)
        counts = pd.Series(p[sel]).value_counts()
        query_only[lab] = {"n": int(sel.sum()), "predicted_as": counts.head(3).to_dict()}
    if query_only:
        logger.warning(
            "query labels the reference never had (reported separately, not scored): %s",
            ", ".join(f"{k} ({v['n']})" for k, v in query_only.items()),
        )
    if not known.any():
        raise InputError(
            "no query cell carries a label the reference knows: check --label-key (reference "
            f"classes: {', '.join(classes[:10])})"
        )
    yt, yp = t_str[known], p[known]
    prec, rec, f1, sup = precision_recall_fscore_support(yt, yp, labels=classes, zero_division=0)
    per_class = pd.DataFrame(
        {"precision": prec, "recall": rec, "f1": f1, "support": sup}, index=classes
    )
    present = [c for c in classes if (yt == c).any()]
    pred_cols = classes + sorted(set(yp) - set(classes))
    conf = pd.crosstab(pd.Categorical(yt, categories=classes), pd.Categorical(yp, pred_cols))
    conf = conf.reindex(index=classes, columns=pred_cols, fill_value=0)
    conf.index.name, conf.columns.name = "true", "predicted"
    return AnnotationScores(
        accuracy=float(accuracy_score(yt, yp)),
        macro_f1=float(f1_score(yt, yp, labels=present, average="macro", zero_division=0)),
        n_scored=int(known.sum()),
        per_class=per_class,
        confusion=conf,
        n_unlabelled=int(missing.sum()),
        query_only=query_only,
        n_unknown=int((yp == "unknown").sum()),
    )


# ----------------------------------------------------------------------------- baselines
def _log_normalised(ref: AnnData, query: AnnData, layer: str | None) -> tuple[Any, Any, list[str]]:
    """Shared genes, normalised to 1e4 counts + log1p (what CellTypist expects too)."""
    import anndata
    import scanpy as sc

    genes = [g for g in ref.var_names if g in set(query.var_names)]
    if len(genes) < 10:
        raise InputError(f"reference and query share only {len(genes)} genes: cannot compare")
    out = []
    for a in (ref, query):
        X = a.X if layer is None else a.layers[layer]
        b = anndata.AnnData(X=X[:, a.var_names.get_indexer(genes)].astype(np.float32))
        b.obs_names, b.var_names = a.obs_names, genes
        sc.pp.normalize_total(b, target_sum=1e4)
        sc.pp.log1p(b)
        out.append(b)
    return out[0], out[1], genes


def _knn(ref_x: np.ndarray, labels: np.ndarray, q_x: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=k).fit(ref_x, labels).predict(q_x)


def run_baselines(
    ref: AnnData,
    query: AnnData,
    label_key: str,
    *,
    batch_key: str | None = None,
    methods: Sequence[str] = BASELINES,
    layer: str | None = None,
    n_comps: int = 50,
    k: int = 15,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, float]]:
    """Predicted query labels and wall seconds per baseline (fitted on ``ref`` only)."""
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    bad = [m for m in methods if m not in BASELINES]
    if bad:
        raise InputError(f"unknown baseline(s) {bad}: choose from {', '.join(BASELINES)}")
    r, q, _ = _log_normalised(ref, query, layer)
    y = ref.obs[label_key].astype(str).to_numpy()
    out: dict[str, tuple[np.ndarray, float]] = {}

    def timed(name: str, fn: Callable[[], np.ndarray]) -> None:
        if name in methods:
            t0 = time.perf_counter()
            out[name] = (np.asarray(fn()).astype(str), time.perf_counter() - t0)
            logger.info("baseline %s: %.1f s", name, out[name][1])

    t0 = time.perf_counter()
    pca = PCA(n_components=min(n_comps, r.n_vars - 1), random_state=seed)
    ref_pc = pca.fit_transform(r.X.toarray() if hasattr(r.X, "toarray") else r.X)
    q_pc = pca.transform(q.X.toarray() if hasattr(q.X, "toarray") else q.X)
    pca_s = time.perf_counter() - t0
    timed("logreg_pca", lambda: LogisticRegression(max_iter=1000).fit(ref_pc, y).predict(q_pc))
    timed("knn_pca", lambda: _knn(ref_pc, y, q_pc, k))
    for name in ("logreg_pca", "knn_pca"):
        if name in out:
            out[name] = (out[name][0], out[name][1] + pca_s)

    def harmony() -> np.ndarray:
        import anndata

        from celltune.eval.baselines import harmony_embedding

        joint = anndata.concat([r, q], index_unique=None)
        rb = ref.obs[batch_key].astype(str) if batch_key else pd.Series("reference", ref.obs_names)
        qb = query.obs[batch_key].astype(str) if batch_key else pd.Series("query", query.obs_names)
        joint.obs["_batch"] = np.concatenate([rb.to_numpy(), "query:" + qb.to_numpy()])
        joint.obsm["X_pca"] = sc.pp.pca(joint.X, n_comps=n_comps, random_state=seed)
        emb = harmony_embedding(joint, "_batch", seed=seed)
        return _knn(emb[: r.n_obs], y, emb[r.n_obs :], k)

    timed("knn_harmony", harmony)

    def celltypist_fit() -> np.ndarray:
        import celltypist

        # celltypist 1.x's default logistic-regression path passes ``multi_class``, which
        # scikit-learn >= 1.8 removed; its SGD path (the same log-loss model) still works.
        model = celltypist.train(
            r, labels=y, n_jobs=1, use_SGD=True, max_iter=1000, check_expression=False
        )
        return (
            celltypist.annotate(q, model=model, majority_voting=False)
            .predicted_labels["predicted_labels"]
            .to_numpy()
        )

    timed("celltypist", celltypist_fit)
    return out
