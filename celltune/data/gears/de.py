"""GEARS DE genes: ``rank_genes_groups_cov_all`` and the top-20 non-dropout / non-zero lists."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from celltune.data.gears.conditions import CTRL
from celltune.errors import InputError

logger = logging.getLogger(__name__)

DE_KEYS = (
    "rank_genes_groups_cov_all",
    "top_non_dropout_de_20",
    "top_non_zero_de_20",
    "non_dropout_gene_idx",
    "non_zeros_gene_idx",
)


def as_csr(X: Any) -> sp.csr_matrix:
    return X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))


def _group_means(X: sp.csr_matrix, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Dense (n_groups, n_genes) mean expression via a sparse indicator product."""
    n = X.shape[0]
    ind = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_groups, n))
    sums = np.asarray((ind @ X).todense(), dtype=np.float64)
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    return sums / np.maximum(counts, 1)[:, None]


#: a condition with fewer cells than this has no t-test; its genes are ranked by |change|
MIN_CELLS_DE = 2


def _rank_cell_type(sub: AnnData, ref: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Gene ids per condition_name, ranked as GEARS does (t-test vs control, by |t|).

    A condition with fewer than ``MIN_CELLS_DE`` cells (or a control that small) has no
    variance to test: its genes are ranked by the absolute difference of its mean from
    the control mean instead; those conditions are returned second.
    """
    import scanpy as sc

    names = sub.obs["condition_name"].astype(str)
    sizes = names.value_counts()
    gene_ids = np.asarray(sub.var_names.astype(str))
    testable = [g for g in sizes.index if sizes[g] >= MIN_CELLS_DE and g != ref]
    out: dict[str, np.ndarray] = {}
    by_change: list[str] = []
    if sizes.get(ref, 0) >= MIN_CELLS_DE and testable:
        t = sub[names.isin([*testable, ref]).to_numpy()].copy()
        t.obs["condition_name"] = t.obs["condition_name"].astype(str).astype("category")
        with warnings.catch_warnings():  # scanpy's own pandas fragmentation warnings
            warnings.simplefilter("ignore", category=pd.errors.PerformanceWarning)
            sc.tl.rank_genes_groups(
                t,
                groupby="condition_name",
                reference=ref,
                rankby_abs=True,
                n_genes=t.n_vars,
                use_raw=False,
                method="t-test",
            )
        ranked = t.uns["rank_genes_groups"]["names"]
        out = {g: np.asarray(ranked[g]).astype(str) for g in ranked.dtype.names}
    X = as_csr(sub.X)
    ctrl_mean = np.asarray(X[(names == ref).to_numpy()].mean(axis=0)).ravel()
    for g in sizes.index:
        if g == ref or g in out:
            continue
        change = np.abs(np.asarray(X[(names == g).to_numpy()].mean(axis=0)).ravel() - ctrl_mean)
        out[g] = gene_ids[np.argsort(-change, kind="stable")]
        by_change.append(g)
    return out, by_change


def compute_de_genes(adata: AnnData, n_top: int = 20) -> dict[str, dict[str, np.ndarray]]:
    """GEARS DE genes: rank all genes per condition vs control, then the top-20 filters.

    Expects log-normalised ``X`` and the GEARS ``obs`` columns; stores the five ``DE_KEYS``
    in ``adata.uns`` and returns them.
    """

    for col in ("condition", "cell_type", "condition_name"):
        if col not in adata.obs.columns:
            raise InputError(
                f"obs column {col!r} is missing; it is needed for GEARS DE genes. Fix: run "
                "'celltune perturb prepare' first (it adds the GEARS obs columns)."
            )
    gene_ids = np.asarray(adata.var_names.astype(str))
    ranked: dict[str, np.ndarray] = {}
    by_change: list[str] = []
    for cell_type in pd.unique(adata.obs["cell_type"].astype(str)):
        sub = adata[adata.obs["cell_type"].astype(str) == cell_type].copy()
        sub.obs["condition_name"] = sub.obs["condition_name"].astype(str).astype("category")
        ref = f"{cell_type}_{CTRL}_1"
        groups = sub.obs["condition_name"].cat.categories
        if ref not in groups:
            raise InputError(
                f"cell type {cell_type!r} has no control cells ({ref!r}); GEARS ranks DE genes "
                "against the control of the same cell type. Fix: add control cells for it or "
                "drop its cells."
            )
        if len(groups) < 2:
            continue
        got, small = _rank_cell_type(sub, ref)
        ranked.update(got)
        by_change.extend(small)

    X = as_csr(adata.X)
    cond = adata.obs["condition"].astype(str)
    cats = pd.Index(pd.unique(cond))
    codes = cats.get_indexer(cond)
    means = _group_means(X, codes, len(cats))
    ctrl_mean = means[cats.get_loc(CTRL)]
    name_to_cond = dict(zip(adata.obs["condition_name"].astype(str), cond, strict=True))
    id_to_idx = {g: i for i, g in enumerate(gene_ids)}

    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in DE_KEYS}
    out["rank_genes_groups_cov_all"] = ranked
    for name, genes in ranked.items():
        mean_p = means[cats.get_loc(name_to_cond[name])]
        non_zero = np.flatnonzero(mean_p != 0)
        true_zero = np.flatnonzero((mean_p == 0) & (ctrl_mean == 0))
        non_dropout = np.sort(np.concatenate([non_zero, true_zero]))
        is_nz = np.zeros(len(gene_ids), bool)
        is_nz[non_zero] = True
        is_nd = np.zeros(len(gene_ids), bool)
        is_nd[non_dropout] = True
        idx = np.array([id_to_idx[g] for g in genes], dtype=np.int64)
        out["top_non_dropout_de_20"][name] = gene_ids[idx[is_nd[idx]][:n_top]]
        out["top_non_zero_de_20"][name] = gene_ids[idx[is_nz[idx]][:n_top]]
        out["non_dropout_gene_idx"][name] = non_dropout.astype(np.int64)
        out["non_zeros_gene_idx"][name] = non_zero.astype(np.int64)
    for key, value in out.items():
        adata.uns[key] = value
    # conditions too small for the t-test (GEARS would stop): ranked by |mean − ctrl mean|
    adata.uns["de_by_abs_change"] = np.asarray(sorted(by_change), dtype=str)
    if by_change:
        logger.warning(
            "%d condition(s) have fewer than %d cells, too few for GEARS' t-test: their DE "
            "genes are ranked by |mean change vs control| instead (uns['de_by_abs_change'])",
            len(by_change),
            MIN_CELLS_DE,
        )
    return out


def check_de_agreement(
    stored: dict[str, Any], computed: dict[str, dict[str, np.ndarray]], n_ranked: int = 20
) -> list[str]:
    """Condition names whose stored DE keys disagree with ``computed`` (empty = agree).

    The ranked lists are compared on their first ``n_ranked`` genes (the part any metric
    uses; t-scores tied further down may legitimately swap), the other keys exactly.
    """
    bad: set[str] = set()
    for key in DE_KEYS:
        if key not in stored:
            continue
        ours, theirs = computed[key], stored[key]
        if set(ours) != set(theirs):
            bad |= set(ours) ^ set(theirs)
        for name in set(ours) & set(theirs):
            a = np.asarray(ours[name])
            b = np.asarray(theirs[name])
            if key == "rank_genes_groups_cov_all":
                a, b = a[:n_ranked], b[:n_ranked]
            if a.shape != b.shape or not np.array_equal(a.astype(str), b.astype(str)):
                bad.add(name)
    return sorted(bad)
