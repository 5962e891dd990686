"""Chunked passes over a :class:`~celltune.data.source.CellSource` behind ``celltune stats``.

The in-memory and the streamed (``--stream``) paths run the same two passes over row
chunks of ``chunk_rows`` rows, so their moment statistics are equal to the last bit:

1. :func:`scan_input` — the input kind (raw counts, log-normalised, other; the rule of
   :func:`~celltune.analysis.perturbation_groups.detect_input_kind` over all values) and
   each cell's library size (4 bytes a cell, for the median the normalisation uses);
2. :func:`accumulate` — per group × gene: non-zero counts, sums and sums of squares of
   the log-normalised values, the control cells' moments of the input values, and the
   sums of each perturbation's two random halves (the split-half ceiling).

What stays in memory is (groups × genes) tables, one chunk of rows and a few bytes per
cell (group code, half label, library size), never cells × genes.

DE tests need all cells of a group at once; :func:`de_rows` chooses a bounded, seeded
subsample per group and :func:`read_log_rows` reads those rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from celltune.analysis.perturbation_groups import LOG, NORM, RAW, group_moments
from celltune.data.source import CellSource
from celltune.errors import InputError

#: Rows per chunk of both passes (and of ``group_moments`` before issue 10's sources).
CHUNK_ROWS = 20000


@dataclass
class Moments:
    """What the accumulation pass returns (float64 tables; group 0 is the control)."""

    nnz: np.ndarray  # (groups, genes) non-zero counts
    sums: np.ndarray  # (groups, genes) sums of log-normalised values
    sumsq: np.ndarray  # (groups, genes) sums of squares of log-normalised values
    ctrl_sum: np.ndarray  # (genes,) control sums of the input values (counts when raw)
    ctrl_sumsq: np.ndarray  # (genes,) control sums of squares of the input values
    half_sums: np.ndarray  # (2 * groups, genes) sums per (group, half); row 2g + h
    half_n: np.ndarray  # (2 * groups,) cells per (group, half)


def _block(source: CellSource, start: int, stop: int) -> sp.csr_matrix:
    X = source.read_rows(start, stop)
    X.sum_duplicates()
    return X


def _chunks(n: int, chunk_rows: int) -> range:
    return range(0, n, max(1, int(chunk_rows)))


def scan_input(source: CellSource, chunk_rows: int = CHUNK_ROWS) -> tuple[str, np.ndarray]:
    """The input kind over all values, and each cell's total (float32), in one pass."""
    n = source.n_obs
    totals = np.empty(n, dtype=np.float32)
    size, all_int = 0, True
    vmin, vmax, nz_min = np.inf, -np.inf, np.inf
    for a in _chunks(n, chunk_rows):
        X = _block(source, a, min(a + chunk_rows, n))
        totals[a : a + X.shape[0]] = np.asarray(X.sum(axis=1)).ravel()
        d = X.data
        if not d.size:
            continue
        if not np.all(np.isfinite(d)):
            raise InputError("X holds NaN or infinite values. Fix: clean the matrix before stats.")
        size += d.size
        vmin, vmax = min(vmin, float(d.min())), max(vmax, float(d.max()))
        all_int = all_int and bool(np.all(d == np.round(d)))
        nz = d[d != 0]
        if nz.size:
            nz_min = min(nz_min, float(nz.min()))
    if size and vmin < 0:
        raise InputError(
            "X holds negative values (scaled data?). Fix: use counts or log-normalised values "
            "(pick a layer with --layer)."
        )
    if size == 0 or all_int:
        return RAW, totals
    return (LOG if vmax <= 30 and nz_min < 1 else NORM), totals


def library_target(totals: np.ndarray) -> float:
    """The median library size of cells with counts (scanpy's ``normalize_total`` target)."""
    pos = totals[totals > 0]
    return float(np.median(pos)) if pos.size else 1.0


def log_rows(X: sp.csr_matrix, totals: np.ndarray, target: float | None) -> sp.csr_matrix:
    """Rows normalised to ``target`` and log1p-transformed (``target`` None: as they are).

    Row by row the same arithmetic as ``log_normalise`` on the whole matrix."""
    if target is None:
        return X.astype(np.float32, copy=False)
    t = totals.astype(np.float32)
    scale = np.divide(target, t, out=np.zeros_like(t, dtype=np.float64), where=t > 0)
    out = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ X, dtype=np.float32)
    np.log1p(out.data, out=out.data)
    return out


def half_labels(codes: np.ndarray, n_groups: int, seed: int = 0) -> np.ndarray:
    """Per cell: 0 / 1 for the two random halves of its perturbation, -1 for control.

    The draws of ``systematic_variation``: one permutation of each perturbation's cells,
    in group order, from ``default_rng([seed, 83])``; the first ``n // 2`` are half 0.
    """
    rng = np.random.default_rng([seed, 83])
    half = np.full(codes.size, -1, dtype=np.int8)
    for gi in range(1, n_groups):
        cells = rng.permutation(np.flatnonzero(codes == gi))
        if cells.size >= 2:
            half[cells[: cells.size // 2]] = 0
            half[cells[cells.size // 2 :]] = 1
    return half


def accumulate(
    source: CellSource,
    codes: np.ndarray,
    n_groups: int,
    half: np.ndarray,
    totals: np.ndarray,
    target: float | None,
    chunk_rows: int = CHUNK_ROWS,
) -> Moments:
    """Every per-group moment of ``celltune stats`` in one chunked pass (module doc)."""
    n, g = source.shape
    nnz, sums, sumsq = (np.zeros((n_groups, g)) for _ in range(3))
    c_sum, c_sumsq = np.zeros(g), np.zeros(g)
    h_sums = np.zeros((2 * n_groups, g))
    for a in _chunks(n, chunk_rows):
        b = min(a + chunk_rows, n)
        X = _block(source, a, b)
        code = codes[a:b]
        k, _, _ = group_moments(X, code, n_groups, values=False, chunk=b - a)
        nnz += k
        Xl = log_rows(X, totals[a:b], target)
        _, s, s2 = group_moments(Xl, code, n_groups, values=True, chunk=b - a)
        sums += s
        sumsq += s2
        is_c = code == 0
        if is_c.any():
            _, s, s2 = group_moments(X[is_c], np.zeros(int(is_c.sum()), np.int64), 1, True, b - a)
            c_sum += s[0]
            c_sumsq += s2[0]
        h = half[a:b]
        keep = h >= 0
        if keep.any():
            hc = 2 * code[keep].astype(np.int64) + h[keep]
            _, s, _ = group_moments(Xl[keep], hc, 2 * n_groups, values=True, chunk=b - a)
            h_sums += s
    h_codes = 2 * codes[half >= 0].astype(np.int64) + half[half >= 0]
    half_n = np.bincount(h_codes, minlength=2 * n_groups).astype(np.float64)
    return Moments(nnz, sums, sumsq, c_sum, c_sumsq, h_sums, half_n)


def de_rows(codes: np.ndarray, group: int, cap: int | None, seed: int = 0) -> np.ndarray:
    """Sorted rows of one group, a seeded subsample of ``cap`` when it has more cells."""
    rows = np.flatnonzero(codes == group)
    if cap is None or rows.size <= cap:
        return rows
    rng = np.random.default_rng([int(seed), 0xDE, int(group)])
    return np.sort(rng.choice(rows, int(cap), replace=False))


def read_log_rows(
    source: CellSource,
    rows: np.ndarray,
    totals: np.ndarray,
    target: float | None,
    chunk_rows: int = CHUNK_ROWS,
) -> sp.csr_matrix:
    """Log-normalised values of some sorted rows (read in contiguous spans)."""
    X = source.take(rows, chunk_rows)
    X.sum_duplicates()
    return log_rows(X, totals[rows], target)


__all__ = [
    "CHUNK_ROWS",
    "Moments",
    "accumulate",
    "de_rows",
    "half_labels",
    "library_target",
    "log_rows",
    "read_log_rows",
    "scan_input",
]
