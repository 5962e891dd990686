"""GEARS perturbation-level splits (``simulation``, ``single``, ``combo_seen0/1/2``, ...).

Drawn with a ``numpy.random.RandomState(seed)``: the same stream as GEARS'
``np.random.seed(seed)``, without touching global state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from celltune.data.gears.conditions import CTRL, is_combo, is_single, parse_condition
from celltune.errors import InputError

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
        cands = [p for p in perts if is_single(p)]
    elif kind == "combo":
        cands = [p for p in perts if is_combo(p)]
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
    singles = [p for p in perts if is_single(p)]
    combos = [p for p in perts if is_combo(p)]
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
