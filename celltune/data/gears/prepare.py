"""``prepare_perturbation_data``: any Perturb-seq AnnData → GEARS layout; reading it back."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from celltune.data.gears.conditions import (
    CTRL,
    add_gears_obs,
    gene_symbols,
    missing_perturbed_genes,
    normalize_conditions,
    parse_condition,
)
from celltune.data.gears.de import DE_KEYS, as_csr, check_de_agreement, compute_de_genes
from celltune.data.gears.splits import split_conditions
from celltune.data.io import check_raw_counts, looks_log_transformed, read_h5ad
from celltune.errors import InputError

logger = logging.getLogger(__name__)


def _data(X: Any) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def _is_integer_counts(X: Any) -> bool:
    d = _data(X)
    return bool(
        d.size == 0 or (np.all(np.isfinite(d)) and d.min() >= 0 and np.all(d == np.round(d)))
    )


def _is_gears_processed(adata: AnnData) -> bool:
    return "condition_name" in adata.obs.columns and looks_log_transformed(adata.X)


def prepare_perturbation_data(
    adata: AnnData,
    *,
    condition_key: str = "condition",
    control: str = CTRL,
    n_hvg: int = 5000,
    split: str = "simulation",
    seed: int = 1,
    train_gene_set_size: float = 0.75,
    combo_seen2_train_frac: float = 0.75,
    data_is_raw: bool = True,
    bare_as_single: bool = False,
) -> AnnData:
    """Return a new AnnData in GEARS layout with DE genes and a split (see the package doc).

    A file already processed by GEARS (``condition_name`` present, log-normalised ``X``)
    is kept as is (no renormalisation, no HVG); if it carries DE keys they are checked
    against ours and a disagreement raises ``InputError``.
    """
    processed = _check_input(adata, condition_key, data_is_raw)
    out = adata.copy()
    out.X = as_csr(out.X).astype(np.float32)
    out.obs["condition"] = normalize_conditions(
        out.obs[condition_key].values, control=control, bare_as_single=bare_as_single
    ).values
    if "gene_name" not in out.var.columns:
        out.var["gene_name"] = out.var_names.astype(str)
    symbols = gene_symbols(out)
    missing = missing_perturbed_genes(out.obs["condition"], symbols)
    if missing:
        logger.warning(
            "%d perturbed gene(s) are not in the gene list (kept; a model cannot flag them): %s",
            len(missing),
            ", ".join(missing[:20]),
        )
    stored_de = {k: out.uns[k] for k in DE_KEYS if k in out.uns}
    if processed:
        logger.info("input looks GEARS-processed (log-normalised, condition_name): kept as is")
    else:
        out = _normalise_and_select(out, symbols, data_is_raw=data_is_raw, n_hvg=n_hvg)
    add_gears_obs(out)
    _add_de_genes(out, stored_de)
    result = split_conditions(
        out.obs["condition"],
        split,
        seed,
        train_gene_set_size=train_gene_set_size,
        combo_seen2_train_frac=combo_seen2_train_frac,
    )
    assign = result.assignment()
    out.obs["split"] = pd.Categorical(
        out.obs["condition"].astype(str).map(assign).fillna("excluded")
    )
    out.uns["split_subgroups"] = {
        c: group for group, conds in result.test_subgroup.items() for c in conds
    }
    out.uns["perturbed_genes_missing"] = np.asarray(missing, dtype=str)
    celltune_uns = dict(out.uns.get("celltune", {}))
    celltune_uns["perturb_prepare"] = {
        "condition_key": condition_key,
        "control": control,
        "n_hvg": int(n_hvg),
        "split": split,
        "seed": int(seed),
        "train_gene_set_size": float(train_gene_set_size),
        "combo_seen2_train_frac": float(combo_seen2_train_frac),
        "data_is_raw": bool(data_is_raw),
        "gears_processed_input": bool(processed),
        "n_genes": int(out.n_vars),
        "n_conditions": int(out.obs["condition"].nunique()),
    }
    out.uns["celltune"] = celltune_uns
    logger.info(
        "split %s: %s cells; test subgroups %s",
        split,
        dict(out.obs["split"].value_counts()),
        {k: len(v) for k, v in result.test_subgroup.items()},
    )
    return out


def _check_input(adata: AnnData, condition_key: str, data_is_raw: bool) -> bool:
    """Refuse input that cannot be prepared; True when it is already GEARS-processed."""
    if condition_key not in adata.obs.columns:
        raise InputError(
            f"obs column {condition_key!r} not found (columns: "
            f"{', '.join(map(str, adata.obs.columns))}). "
            "Fix: pass the condition column with --condition-key."
        )
    X = adata.X
    if X is None or adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError("the AnnData has no cells, genes or X. Fix: check the input file.")
    processed = _is_gears_processed(adata)
    integer = _is_integer_counts(X)
    if data_is_raw and not processed and not integer:
        check_raw_counts(X, "X")  # raises with the --not-raw hint
    if not data_is_raw and integer and _data(X).size and _data(X).max() > 30:
        raise InputError(
            "--not-raw was given but X looks like raw counts (integers, max "
            f"{_data(X).max():g}). Fix: drop --not-raw so the counts are normalised + log1p."
        )
    if not data_is_raw and not integer and not looks_log_transformed(X):
        logger.warning("X is not raw counts and does not look log1p-transformed; used as is")
    return processed


def _normalise_and_select(
    out: AnnData, symbols: pd.Index, *, data_is_raw: bool, n_hvg: int
) -> AnnData:
    """GEARS preprocessing: total-count normalise + log1p (raw input), HVGs + perturbed genes."""
    import scanpy as sc

    if data_is_raw:
        out.layers["counts"] = out.X.copy()
        sc.pp.normalize_total(out)
        sc.pp.log1p(out)
        out.uns.pop("log1p", None)
    if n_hvg < out.n_vars:
        sc.pp.highly_variable_genes(out, n_top_genes=n_hvg, flavor="seurat")
        keep = out.var["highly_variable"].to_numpy() | symbols.isin(
            {g for c in pd.unique(out.obs["condition"]) for g in parse_condition(c)}
        )
        out = out[:, keep].copy()
        logger.info("kept %d genes (%d HVGs + perturbed genes)", out.n_vars, n_hvg)
    else:
        out.var["highly_variable"] = True
    return out


def _add_de_genes(out: AnnData, stored_de: dict[str, Any]) -> None:
    """Recompute the DE keys; refuse when the file's own lists disagree with GEARS'."""
    for key in DE_KEYS:
        out.uns.pop(key, None)
    computed = compute_de_genes(out)
    if stored_de:
        bad = check_de_agreement(stored_de, computed)
        if bad:
            raise InputError(
                f"the DE gene lists stored in the file disagree with GEARS' definition for "
                f"{len(bad)} condition(s): {', '.join(bad[:5])}. Fix: remove the uns keys "
                f"{', '.join(DE_KEYS)} to have them recomputed, or check the file's X."
            )


def write_prepared(adata: AnnData, path: str | os.PathLike[str]) -> Path:
    """Write a prepared AnnData atomically, gzip-compressed."""
    from celltune.files import atomic_path

    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")
    return Path(path)


def load_prepared(path: str | os.PathLike[str], compute_missing_de: bool = True) -> AnnData:
    """Read a prepared or GEARS ``perturb_processed.h5ad`` file and validate its layout.

    Missing GEARS ``obs`` columns are derived from ``condition``; missing DE keys are
    computed (the Adamson mini file ships none) when ``compute_missing_de``.
    """
    adata = read_h5ad(path)
    if "condition" not in adata.obs.columns:
        raise InputError(
            f"{path}: obs has no 'condition' column. Fix: run 'celltune perturb prepare' on "
            "the raw data first."
        )
    cond = normalize_conditions(adata.obs["condition"].values)
    if not np.array_equal(cond.values, adata.obs["condition"].astype(str).values):
        raise InputError(
            f"{path}: conditions are not in GEARS spelling. Fix: run 'celltune perturb prepare'."
        )
    if adata.X is None or (_is_integer_counts(adata.X) and _data(adata.X).max() > 30):
        raise InputError(
            f"{path}: X looks like raw counts, not normalised + log1p. Fix: run "
            "'celltune perturb prepare' on it first."
        )
    if "gene_name" not in adata.var.columns:
        adata.var["gene_name"] = adata.var_names.astype(str)
    if not {"dose_val", "control", "condition_name", "cell_type"} <= set(adata.obs.columns):
        add_gears_obs(adata)
    missing = [k for k in DE_KEYS if k not in adata.uns]
    if missing and compute_missing_de:
        logger.info("%s has no GEARS DE keys; computing them", path)
        compute_de_genes(adata)
    return adata
