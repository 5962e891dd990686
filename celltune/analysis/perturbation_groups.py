"""Per-group sums, the input kind and scanpy's DE tests behind ``celltune stats``.

Everything is computed from sparse per-group sums (an indicator matrix times ``X``), so
memory grows with the non-zeros plus a dense (groups × genes) table, never cells × genes.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from celltune.errors import InputError

RAW = "raw counts"
LOG = "log-normalised"
NORM = "normalised (not log)"


def _data(X: Any) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def detect_input_kind(X: Any) -> str:
    """``raw counts`` (non-negative integers), ``log-normalised`` (SPEC §1 rule) or other."""
    d = _data(X)
    if d.size and not np.all(np.isfinite(d)):
        raise InputError("X holds NaN or infinite values. Fix: clean the matrix before stats.")
    if d.size and d.min() < 0:
        raise InputError(
            "X holds negative values (scaled data?). Fix: use counts or log-normalised values "
            "(pick a layer with --layer)."
        )
    if d.size == 0 or np.all(d == np.round(d)):
        return RAW
    nz = d[d != 0]
    if d.max() <= 30 and nz.min() < 1:
        return LOG
    return NORM


def _indicator(codes: np.ndarray, n_groups: int) -> sp.csr_matrix:
    n = codes.size
    return sp.csr_matrix((np.ones(n, np.float64), (codes, np.arange(n))), shape=(n_groups, n))


def group_moments(
    X: sp.csr_matrix, codes: np.ndarray, n_groups: int, values: bool, chunk: int = 20000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group × gene: non-zero counts, sums and sums of squares (float64).

    Works on row chunks so the temporaries stay a fraction of ``X``.
    """
    shape = (n_groups, X.shape[1])
    nnz, sums, sumsq = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for start in range(0, X.shape[0], chunk):
        block = X[start : start + chunk]
        G = _indicator(codes[start : start + chunk], n_groups)
        data = block.data.astype(np.float64)
        ind = sp.csr_matrix(
            ((data != 0).astype(np.float64), block.indices, block.indptr), block.shape
        )
        nnz += _dense(G @ ind)
        if values:
            sums += _dense(G @ sp.csr_matrix((data, block.indices, block.indptr), block.shape))
            sumsq += _dense(G @ sp.csr_matrix((data**2, block.indices, block.indptr), block.shape))
    return nnz, sums, sumsq


def _dense(m: Any) -> np.ndarray:
    return np.asarray(m.todense() if sp.issparse(m) else m, dtype=np.float64)


def log_normalise(X: sp.csr_matrix) -> sp.csr_matrix:
    """Total-count normalise to the median library size, then log1p (scanpy's default)."""
    totals = np.asarray(X.sum(axis=1)).ravel()
    target = float(np.median(totals[totals > 0])) if np.any(totals > 0) else 1.0
    scale = np.divide(target, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    out = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ X, dtype=np.float32)
    np.log1p(out.data, out=out.data)
    return out


def condition_targets(cond: str, control: str) -> tuple[str, ...]:
    """Perturbed genes named by a condition (GEARS ``A+B`` / ``A+ctrl`` or a bare gene)."""
    if cond == control:
        return ()
    return tuple(p for p in str(cond).split("+") if p and p != "ctrl")


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (NaN-safe)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    if q.size:
        order = np.argsort(q)
        ranked = q[order] * q.size / np.arange(1, q.size + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        res = np.empty_like(q)
        res[order] = np.minimum(ranked, 1.0)
        out[ok] = res
    return out


def quartiles(v: np.ndarray) -> dict[str, float]:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan")}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {
        "median": float(med),
        "q1": float(q1),
        "q3": float(q3),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def rank_genes(
    Xlog: sp.csr_matrix,
    groups: pd.Series,
    control: str,
    tested: list[str],
    method: str,
    var_names: pd.Index,
) -> pd.DataFrame:
    """Long table (group, gene, score, lfc, pvals, pvals_adj) from scanpy for ``tested``."""
    import scanpy as sc

    mask = groups.isin([*tested, control]).to_numpy()
    n_sub = int(mask.sum())
    sub = AnnData(
        X=Xlog if mask.all() else Xlog[mask],
        obs=pd.DataFrame(
            {"g": pd.Categorical(groups[mask].astype(str).to_numpy())},
            index=pd.Index([str(i) for i in range(n_sub)]),
        ),
        var=pd.DataFrame(index=pd.Index(var_names.astype(str))),
    )
    sub.uns["log1p"] = {"base": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            sub,
            groupby="g",
            groups=tested,
            reference=control,
            method=method,
            n_genes=sub.n_vars,
            rankby_abs=True,
            use_raw=False,
            corr_method="benjamini-hochberg",
        )
        df = sc.get.rank_genes_groups_df(sub, group=None)
    if "group" not in df.columns:  # a single tested group comes back without the column
        df.insert(0, "group", tested[0])
    df = df.rename(columns={"names": "gene", "logfoldchanges": "lfc"})
    df["group"] = df["group"].astype(str)
    df["rank"] = df.groupby("group").cumcount()
    return df[["group", "gene", "rank", "scores", "lfc", "pvals", "pvals_adj"]]
