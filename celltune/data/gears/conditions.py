"""GEARS condition strings (``ctrl``, ``A+ctrl``, ``A+B``) and the GEARS ``obs`` columns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from celltune.errors import InputError

CTRL = "ctrl"
# Spellings of "control" that must not be taken for a gene name.
_CONTROL_LIKE = {"control", "non-targeting", "nontargeting", "nt", "neg", "negative", "safe"}


def parse_condition(cond: str) -> tuple[str, ...]:
    """Genes perturbed in a GEARS condition string, ``ctrl`` parts dropped."""
    parts = tuple(p for p in str(cond).split("+") if p != CTRL)
    return parts


def is_single(cond: str) -> bool:
    return CTRL in cond.split("+") and cond != CTRL


def is_combo(cond: str) -> bool:
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
