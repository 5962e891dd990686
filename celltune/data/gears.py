"""GEARS-format perturbation data: condition strings, normalisation, DE genes and splits.

Perturbation models (``celltune perturb train``) and the GEARS/scGPT metrics expect data
laid out exactly as GEARS' ``perturb_processed.h5ad`` (see ``shared/docs/perturbation.md``),
so this module reproduces GEARS' conventions without needing the GEARS package.

Public functions (reused by the training / evaluation tasks):

- ``parse_condition(cond) -> tuple[str, ...]``: the perturbed genes of a GEARS condition
  (``"ctrl"`` → ``()``, ``"A+ctrl"`` → ``("A",)``, ``"A+B"`` → ``("A", "B")``).
- ``normalize_conditions(values, control=..., bare_as_single=False)``: map a condition
  column to GEARS spelling or raise an ``InputError`` naming the bad values. Only the
  spelling given as ``control`` is mapped to ``ctrl``; a bare gene ``A`` is mapped to
  ``A+ctrl`` only when ``bare_as_single=True`` (off by default, because a typo such as
  ``control`` would otherwise silently become a perturbation).
- ``add_gears_obs(adata)``: ``dose_val``, ``control``, ``condition_name`` as GEARS.
- ``compute_de_genes(adata)``: ``uns['rank_genes_groups_cov_all']`` (scanpy t-test per
  cell type against ``{cell_type}_ctrl_1``, ``rankby_abs``, all genes) and
  ``top_non_dropout_de_20``, ``top_non_zero_de_20``, ``non_dropout_gene_idx``,
  ``non_zeros_gene_idx`` with GEARS' definitions (non-zero: mean in the condition != 0;
  non-dropout: non-zero or zero in both condition and control).
- ``check_de_agreement(stored, computed)``: condition names whose stored DE lists differ.
- ``split_conditions(conditions, split="simulation", seed=1, ...) -> SplitResult``: GEARS'
  ``simulation``, ``simulation_single``, ``single``, ``combo_seen0/1/2`` (``combo`` is
  ``combo_seen0``) and ``no_test`` splits, drawn with a ``numpy.random.RandomState(seed)``
  (the same stream as GEARS' ``np.random.seed(seed)``, without touching global state).
- ``prepare_perturbation_data(adata, ...) -> AnnData``: all of the above in one call.
- ``load_prepared(path) -> AnnData``: read and validate a prepared or GEARS file.

Perturbed genes absent from the gene list: GEARS keeps such conditions (a model can flag
only genes it knows), so they are kept here too and listed in
``uns['perturbed_genes_missing']``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from celltune.data.io import check_raw_counts, looks_log_transformed, read_h5ad
from celltune.errors import InputError

logger = logging.getLogger(__name__)

CTRL = "ctrl"
DE_KEYS = (
    "rank_genes_groups_cov_all",
    "top_non_dropout_de_20",
    "top_non_zero_de_20",
    "non_dropout_gene_idx",
    "non_zeros_gene_idx",
)
SPLITS = (
    "simulation",
    "simulation_single",
    "single",
    "combo",
    "combo_seen0",
    "combo_seen1",
    "combo_seen2",
    "no_test",
)
# Spellings of "control" that must not be taken for a gene name.
_CONTROL_LIKE = {"control", "non-targeting", "nontargeting", "nt", "neg", "negative", "safe"}


# ---------------------------------------------------------------- conditions


def parse_condition(cond: str) -> tuple[str, ...]:
    """Genes perturbed in a GEARS condition string, ``ctrl`` parts dropped."""
    parts = tuple(p for p in str(cond).split("+") if p != CTRL)
    return parts


def _is_single(cond: str) -> bool:
    return CTRL in cond.split("+") and cond != CTRL


def _is_combo(cond: str) -> bool:
    return CTRL not in cond.split("+")


def normalize_conditions(
    values: Iterable[Any], control: str = CTRL, bare_as_single: bool = False
) -> pd.Series:
    """Return the conditions in GEARS spelling, or raise naming every bad value and the fix."""
    raw = pd.Series(list(values), dtype=object).astype(str)
    mapping: dict[str, str] = {}
    bad: list[str] = []
    for value in pd.unique(raw):
        v = value.strip()
        if v in (CTRL, control):
            mapping[value] = CTRL
            continue
        parts = v.split("+")
        if len(parts) == 1:
            if bare_as_single and v and v.lower() not in _CONTROL_LIKE:
                mapping[value] = f"{v}+{CTRL}"
            else:
                bad.append(value)
            continue
        if len(parts) != 2 or any(not p.strip() for p in parts) or parts == [CTRL, CTRL]:
            bad.append(value)
            continue
        a, b = (p.strip() for p in parts)
        if a.lower() in _CONTROL_LIKE or b.lower() in _CONTROL_LIKE:
            bad.append(value)
        elif a == CTRL:
            mapping[value] = f"{b}+{CTRL}"
        else:
            mapping[value] = f"{a}+{b}"
    if bad:
        shown = ", ".join(repr(b) for b in sorted(bad)[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        ctrl_like = [b for b in bad if b.strip().lower() in _CONTROL_LIKE]
        if ctrl_like:
            ctrl_hint = f"pass --control {ctrl_like[0]!r} if those are the control cells, "
        else:
            ctrl_hint = "pass the control spelling with --control (e.g. --control non-targeting), "
        raise InputError(
            f"{len(bad)} condition value(s) are not in GEARS form ('ctrl', 'GENE+ctrl', "
            f"'GENEA+GENEB'): {shown}{more}. Fix: rename them in the condition column, "
            + ctrl_hint
            + "or add --bare-as-single to read a bare 'GENE' as 'GENE+ctrl'."
        )
    out = raw.map(mapping)
    if not (out == CTRL).any():
        raise InputError(
            f"no control cells: no condition equals 'ctrl' or the control value {control!r}. "
            "Fix: pass the control spelling with --control (GEARS needs control cells)."
        )
    return out


def gene_symbols(adata: AnnData) -> pd.Index:
    """Gene symbols used in condition strings: ``var['gene_name']`` or else ``var_names``."""
    if "gene_name" in adata.var.columns:
        return pd.Index(adata.var["gene_name"].astype(str))
    return pd.Index(adata.var_names.astype(str))


def missing_perturbed_genes(conditions: Iterable[str], genes: Iterable[str]) -> list[str]:
    """Perturbed genes that are not in ``genes`` (sorted)."""
    known = set(genes)
    perturbed = {g for c in pd.unique(pd.Series(list(conditions))) for g in parse_condition(c)}
    return sorted(perturbed - known)


def add_gears_obs(adata: AnnData) -> None:
    """Add ``cell_type`` (if missing), ``dose_val``, ``control``, ``condition_name`` in place."""
    obs = adata.obs
    cond = obs["condition"].astype(str)
    if "cell_type" not in obs.columns:
        obs["cell_type"] = "cell"
    two = cond.str.split("+").str.len() == 2
    obs["dose_val"] = pd.Categorical(np.where(two, "1+1", "1"))
    obs["control"] = np.where(two, 0, 1).astype(np.int64)
    obs["condition"] = pd.Categorical(cond)
    cell_type = obs["cell_type"].astype(str)
    obs["cell_type"] = pd.Categorical(cell_type)
    obs["condition_name"] = pd.Categorical(
        cell_type + "_" + cond + "_" + obs["dose_val"].astype(str)
    )


# ---------------------------------------------------------------- data checks


def _data(X: Any) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def _is_integer_counts(X: Any) -> bool:
    d = _data(X)
    return bool(
        d.size == 0 or (np.all(np.isfinite(d)) and d.min() >= 0 and np.all(d == np.round(d)))
    )


def _csr(X: Any) -> sp.csr_matrix:
    return X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))


def _group_means(X: sp.csr_matrix, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Dense (n_groups, n_genes) mean expression via a sparse indicator product."""
    n = X.shape[0]
    ind = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_groups, n))
    sums = np.asarray((ind @ X).todense(), dtype=np.float64)
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    return sums / np.maximum(counts, 1)[:, None]


# ---------------------------------------------------------------- DE genes


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
    X = _csr(sub.X)
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

    X = _csr(adata.X)
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


# ---------------------------------------------------------------- splits


@dataclass
class SplitResult:
    """Train/val/test condition lists and the GEARS subgroup of each test/val condition."""

    train: list[str]
    val: list[str]
    test: list[str]
    test_subgroup: dict[str, list[str]] = field(default_factory=dict)
    val_subgroup: dict[str, list[str]] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)

    def assignment(self) -> dict[str, str]:
        """Condition → ``train`` / ``val`` / ``test`` / ``excluded``; ``ctrl`` → train."""
        out = {c: "excluded" for c in self.excluded}
        out.update({c: "train" for c in self.train})
        out.update({c: "val" for c in self.val})
        out.update({c: "test" for c in self.test})
        out[CTRL] = "train"
        return out


def _genes_of(perts: Sequence[str]) -> np.ndarray:
    genes = [
        g
        for p in np.unique(np.asarray(list(perts), dtype=object).astype(str))
        for g in p.split("+")
    ]
    return np.unique([g for g in genes if g != CTRL])


def _perts_of(genes: Iterable[str], perts: Sequence[str], kind: str) -> list[str]:
    """GEARS ``get_perts_from_genes``: perts of ``kind`` containing any of ``genes``."""
    gene_set = set(np.asarray(list(genes)).astype(str).tolist())
    if kind == "single":
        cands = [p for p in perts if _is_single(p)]
    elif kind == "combo":
        cands = [p for p in perts if _is_combo(p)]
    else:
        cands = list(perts)
    return [p for p in cands if any(g in gene_set for g in parse_condition(p))]


def _n_seen(pert: str, seen: set[str]) -> int:
    return sum(g in seen for g in pert.split("+"))


def _simulation(
    seed: int, perts: list[str], train_frac: float, combo_frac: float
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """GEARS ``get_simulation_split``; it seeds once for the genes and again for the combos."""
    rng = np.random.RandomState(seed)
    genes = _genes_of(perts)
    train_genes = rng.choice(genes, int(len(genes) * train_frac), replace=False)
    seen = set(train_genes.tolist())
    ood = np.setdiff1d(genes, train_genes)
    train = _perts_of(train_genes, perts, "single")
    combos = _perts_of(train_genes, perts, "combo")
    seen1 = [p for p in combos if _n_seen(p, seen) == 1]
    rest = np.setdiff1d(combos, seen1) if combos else np.array([], dtype=object)
    rng = np.random.RandomState(seed)
    combo_train = (
        rng.choice(rest, int(len(rest) * combo_frac), replace=False) if len(rest) else rest
    )
    seen2 = np.setdiff1d(rest, combo_train).tolist() if len(rest) else []
    train.extend(np.asarray(combo_train).astype(str).tolist())
    unseen = _perts_of(ood, perts, "single")
    seen0 = [p for p in _perts_of(ood, perts, "combo") if _n_seen(p, seen) == 0]
    test = seen1 + seen2 + unseen + seen0
    groups = {
        "combo_seen0": seen0,
        "combo_seen1": seen1,
        "combo_seen2": [str(s) for s in seen2],
        "unseen_single": unseen,
    }
    return train, test, groups


def _simulation_single(
    rng: np.random.RandomState, perts: list[str], train_frac: float
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    genes = _genes_of(perts)
    train_genes = rng.choice(genes, int(len(genes) * train_frac), replace=False)
    ood = np.setdiff1d(genes, train_genes)
    train = _perts_of(train_genes, perts, "single")
    unseen = _perts_of(ood, perts, "single")
    return train, unseen, {"unseen_single": unseen}


def _split_list(
    rng: np.random.RandomState, perts: list[str], kind: str, seen: int, test_size: float
) -> tuple[list[str], list[str], list[str]]:
    """GEARS ``get_split_list``: returns (train, test, held out)."""
    singles = [p for p in perts if _is_single(p)]
    combos = [p for p in perts if _is_combo(p)]
    genes = _genes_of(perts)
    hold_out: list[str] = []
    # GEARS always draws the test genes first (with replacement), even for the splits that
    # then ignore them, so the RNG stream matches only if we do the same.
    test_genes = set(rng.choice(genes, int(len(singles) * test_size)).tolist())
    if kind == "single":
        test = _perts_of(test_genes, singles, "single")
        hold_out = _perts_of(test_genes, perts, "combo")
    elif kind == "combo" and seen in (0, 1):
        s = _perts_of(test_genes, singles, "single")
        c = _perts_of(test_genes, combos, "combo")
        limit = 0 if seen == 0 else 1
        hold_out = [p for p in c if sum(g not in test_genes for g in p.split("+")) > limit]
        test = s + [p for p in c if p not in hold_out]
    elif kind == "combo":
        test = (
            rng.choice(combos, int(len(combos) * test_size)).astype(str).tolist() if combos else []
        )
    else:
        test = rng.choice(perts, int(len(perts) * test_size)).astype(str).tolist()
    test_set, hold_set = set(test), set(hold_out)
    train = [p for p in perts if p not in test_set and p not in hold_set]
    return train, sorted(test_set, key=test.index), hold_out


def split_conditions(
    conditions: Iterable[str],
    split: str = "simulation",
    seed: int = 1,
    *,
    train_gene_set_size: float = 0.75,
    combo_seen2_train_frac: float = 0.75,
    test_size: float = 0.1,
    val_size: float = 0.1,
) -> SplitResult:
    """GEARS perturbation-level split of the unique conditions (``ctrl`` always in train).

    ``train_gene_set_size`` defaults to GEARS' 0.75 (``simulation_single`` in GEARS uses
    0.85 by default; pass it explicitly to match). Raises ``InputError`` when the split
    leaves no test perturbation (except ``no_test``).
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}. Fix: use one of {', '.join(SPLITS)}.")
    perts = [p for p in pd.unique(pd.Series([str(c) for c in conditions])) if p != CTRL]
    if not perts:
        raise InputError("no perturbed conditions (only 'ctrl'). Fix: check the condition column.")
    rng = np.random.RandomState(seed)
    excluded: list[str] = []
    test_sub: dict[str, list[str]] = {}
    val_sub: dict[str, list[str]] = {}
    if split == "simulation":
        train, test, test_sub = _simulation(
            seed, perts, train_gene_set_size, combo_seen2_train_frac
        )
        train, val, val_sub = _simulation(seed, train, 0.9, 0.9)  # GEARS re-seeds here too
    elif split == "simulation_single":
        train, test, test_sub = _simulation_single(rng, perts, train_gene_set_size)
        rng = np.random.RandomState(seed)
        train, val, val_sub = _simulation_single(rng, train, 0.9)
    elif split == "no_test":
        train, val, excluded = _split_list(rng, perts, "no_test", 0, val_size)
        test = []
    else:
        kind = "single" if split == "single" else "combo"
        seen = int(split[-1]) if split.startswith("combo_seen") else 0  # combo = combo_seen0
        train, test, hold = _split_list(rng, perts, kind, seen, test_size)
        train, val, hold_val = _split_list(rng, train, kind, seen, val_size)
        excluded = hold + hold_val
        test_sub = {"combo_seen" + str(seen) if kind == "combo" else "unseen_single": test}
    if split != "no_test" and not test:
        raise InputError(
            f"the {split!r} split leaves no test perturbation ({len(perts)} perturbed "
            "conditions). Fix: use more perturbations, a smaller --train-gene-set-size, "
            "another --split or --seed, or --split no_test."
        )
    return SplitResult(
        train=list(train),
        val=list(val),
        test=list(test),
        test_subgroup={k: list(v) for k, v in test_sub.items()},
        val_subgroup={k: list(v) for k, v in val_sub.items()},
        excluded=[e for e in excluded if e not in set(train) | set(val) | set(test)],
    )


# ---------------------------------------------------------------- preparation


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
    """Return a new AnnData in GEARS layout with DE genes and a split (see module doc).

    A file already processed by GEARS (``condition_name`` present, log-normalised ``X``)
    is kept as is (no renormalisation, no HVG); if it carries DE keys they are checked
    against ours and a disagreement raises ``InputError``.
    """
    import scanpy as sc

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

    out = adata.copy()
    out.X = _csr(out.X).astype(np.float32)
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
    add_gears_obs(out)
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
    counts = out.obs["split"].value_counts()
    logger.info(
        "split %s: %s cells; test subgroups %s",
        split,
        dict(counts),
        {k: len(v) for k, v in result.test_subgroup.items()},
    )
    return out


def write_prepared(adata: AnnData, path: str | os.PathLike[str]) -> Path:
    """Write a prepared AnnData atomically."""
    from celltune.files import atomic_path

    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
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
