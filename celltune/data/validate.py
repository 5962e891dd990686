"""One input-validation layer: the same input gets the same answer from every command.

Commands and the Python API call these before anything is computed or written, so a
defect (NaN, negative values, duplicate names, an empty matrix, a group too small for a
test, an ``--out`` that is the input) is one :class:`InputError` naming the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from celltune.errors import InputError


def _values(X: Any) -> np.ndarray:
    """The stored values of a dense or sparse matrix (no densifying of sparse data)."""
    data = getattr(X, "data", None)
    if data is not None and hasattr(X, "nnz"):
        return np.asarray(data)
    return np.asarray(X)


def check_finite(X: Any, where: str = "X") -> None:
    """Refuse NaN/inf values (whatever the normalisation: they poison every statistic)."""
    v = _values(X)
    if v.size and np.issubdtype(v.dtype, np.floating):
        bad = ~np.isfinite(v)
        if bad.any():
            n_nan = int(np.isnan(v).sum())
            raise InputError(
                f"{where} contains {n_nan:,} NaN and {int(bad.sum()) - n_nan:,} infinite "
                "values; replace them (e.g. with 0) or drop the affected cells first"
            )


def check_not_empty(adata: Any, where: str = "the input") -> None:
    """Refuse 0 cells or 0 genes before any step divides by them."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"{where} has {adata.n_obs} cells × {adata.n_vars} genes; it needs at least one "
            "of each: check the filters that produced it"
        )


def _duplicates_error(axis: str, names: Any, where: str) -> InputError:
    """One message for duplicate names, whichever object holds them (same input, same answer)."""
    import pandas as pd

    names = pd.Index(names)
    dups = names[names.duplicated()].unique()[:3]
    why = (
        "celltune keys every cell's random draws and outputs on its name"
        if axis == "obs"
        else "each gene becomes one token by its name"
    )
    return InputError(
        f"{where} has {int(names.duplicated().sum()):,} duplicate {axis}_names (e.g. "
        f"{', '.join(map(str, dups))}); {why}: make them unique first "
        f"(adata.{axis}_names_make_unique())"
    )


def check_unique_names(adata: Any, *, make_unique: bool = False, where: str = "the input") -> None:
    """Refuse duplicate obs/var names (or make them unique in place when asked)."""
    for axis in ("obs", "var"):
        names = getattr(adata, f"{axis}_names")
        if names.is_unique:
            continue
        if make_unique:
            getattr(adata, f"{axis}_names_make_unique")()
            continue
        raise _duplicates_error(axis, names, where)


def check_source_names(source: Any, where: str | None = None, chunk_rows: int = 65536) -> None:
    """:func:`check_not_empty` and :func:`check_unique_names` for a file read row by row
    (a :class:`~celltune.data.source.CellSource`): cell names are read a chunk at a time
    and compared by 64-bit hash (8 bytes a cell), duplicates confirmed by name."""
    import pandas as pd

    where = where or getattr(source, "where", "") or "the input"
    check_not_empty(source, where)
    var = pd.Index(source.var_names())
    if not var.is_unique:
        raise _duplicates_error("var", var, where)
    n = source.n_obs
    spans = [(a, min(a + chunk_rows, n)) for a in range(0, n, chunk_rows)]
    hashes = np.concatenate(
        [pd.util.hash_array(np.asarray(source.obs_names(a, b), dtype=object)) for a, b in spans]
    )
    uniq, counts = np.unique(hashes, return_counts=True)
    suspects = uniq[counts > 1]
    if suspects.size == 0:
        return
    names = [
        nm
        for a, b in spans
        for nm, hit in zip(source.obs_names(a, b), np.isin(hashes[a:b], suspects), strict=True)
        if hit
    ]
    if not pd.Index(names).is_unique:  # not a hash collision
        raise _duplicates_error("obs", names, where)


def check_group_sizes(groups: Any, minimum: int, what: str, fix: str) -> None:
    """Refuse groups (conditions, batches) with fewer than ``minimum`` cells."""
    counts = groups.value_counts()
    small = counts[counts < minimum]
    if len(small):
        shown = ", ".join(f"{k} ({v})" for k, v in small.head(5).items())
        raise InputError(f"{len(small)} {what} have fewer than {minimum} cells: {shown}; {fix}")


def check_out_not_input(out: str | os.PathLike[str], inputs: Iterable[Any]) -> None:
    """Refuse an ``--out`` that resolves to one of the inputs (it would replace it)."""
    target = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if target == src or (target.exists() and src.exists() and os.path.samefile(target, src)):
            raise InputError(
                f"--out {out} is the input file {item}; writing would replace your data: "
                "choose another --out"
            )


def validate_input(
    adata: Any,
    *,
    where: str = "the input",
    make_unique: bool = False,
    layer: str | None = None,
) -> None:
    """The checks every command runs on an AnnData: non-empty, unique names, finite."""
    check_not_empty(adata, where)
    check_unique_names(adata, make_unique=make_unique, where=where)
    X = adata.X if layer is None else adata.layers[layer]
    if X is not None and not getattr(adata, "isbacked", False):
        check_finite(X, where if layer is None else f"layer {layer!r} of {where}")
