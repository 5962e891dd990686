"""Pairing and tokenisation for perturbation-response training (SPEC §6, GEARS pairing).

Why a separate module: the pairing rules are where scGPT's reference goes wrong most
quietly, so they are kept small, pure and unit-tested here.

- Each perturbed training cell is the *target*; its *input* is a control cell drawn at
  random, re-drawn every epoch from ``np.random.default_rng([seed, epoch, cell_key, 0])``
  so a cell gets the same draw whatever mini-batch it lands in, and runs are reproducible.
- Control cells are their own input and target with no flag set (GEARS ``pertdata``:
  ``Xs = ys = X`` for ``ctrl``), teaching the model that "no flag" means "no change".
- Flags are 1 at the perturbed genes, 0 elsewhere, ``pert_pad_id`` on padding.
- When a cell has more genes than ``max_seq_len``, the perturbed genes are *always* kept and
  the rest are sampled (scGPT issue #298 cut them away when 5,060 genes became 1,536).
- Columns ``>= n_measured`` are token-only columns of perturbed genes that are not measured:
  they enter a sequence only when flagged (value 0) and are never scored by the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch

from celltune.errors import InputError

logger = logging.getLogger(__name__)

IncludeZero = Literal["all", "nonzero"]
INCLUDE_ZERO_CHOICES: tuple[str, ...] = ("all", "nonzero")

#: Stream ids appended to the per-cell seed so that the control draw and the gene
#: sub-sampling of one cell are independent streams.
_STREAM_PAIR = 0
_STREAM_GENES = 1


def cell_rng(seed: int, epoch: int, key: int, stream: int) -> np.random.Generator:
    """Per-cell generator (ARCHITECTURE.md: randomness from ``[seed, epoch, cell_key]``)."""
    return np.random.default_rng([int(seed), int(epoch), int(key), int(stream)])


def stable_cell_keys(obs_names: Sequence[str]) -> np.ndarray:
    """Stable 63-bit key per cell name (the data layer's ``cell_keys`` when present)."""
    try:
        from celltune.data.binning import cell_keys
    except ImportError:  # pragma: no cover - only while the data layer is being built
        import hashlib

        out = np.empty(len(obs_names), dtype=np.int64)
        for i, name in enumerate(obs_names):
            digest = hashlib.blake2b(str(name).encode(), digest_size=8).digest()
            out[i] = int.from_bytes(digest, "little") & ((1 << 63) - 1)
        return out
    return np.asarray(cell_keys(obs_names), dtype=np.int64)


def select_gene_positions(
    control_row: np.ndarray,
    pert_cols: np.ndarray,
    *,
    candidate_cols: np.ndarray,
    include_zero_gene: IncludeZero,
    max_seq_len: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Columns (sorted) that make up one cell's sequence.

    ``candidate_cols`` are the columns with a vocabulary id. With ``"nonzero"`` only the
    columns expressed in the control input are used. The perturbed columns are always
    included (even when zero in the input or beyond ``max_seq_len``); the remaining slots
    are filled by sampling without replacement.
    """
    if include_zero_gene == "all":
        pool = candidate_cols
    elif include_zero_gene == "nonzero":
        pool = candidate_cols[control_row[candidate_cols] != 0]
    else:
        raise InputError(
            f"include_zero_gene must be one of {list(INCLUDE_ZERO_CHOICES)}, got "
            f"{include_zero_gene!r}; use 'all' (scGPT's perturbation default) or 'nonzero'"
        )
    pert_cols = np.unique(np.asarray(pert_cols, dtype=np.int64))
    if len(pert_cols) > max_seq_len:
        raise InputError(
            f"{len(pert_cols)} perturbed genes do not fit in max_seq_len={max_seq_len}; "
            "raise --max-seq-len"
        )
    rest = np.setdiff1d(pool, pert_cols, assume_unique=False)
    room = max_seq_len - len(pert_cols)
    if len(rest) > room:
        rest = rng.choice(rest, size=room, replace=False)
    return np.sort(np.concatenate([pert_cols, rest]).astype(np.int64))


@dataclass
class PairedItem:
    """One training example: control input row, target row and the perturbed columns."""

    index: int
    key: int
    control: np.ndarray
    target: np.ndarray
    pert_cols: np.ndarray


class PerturbationPairs(torch.utils.data.Dataset):
    """Targets (perturbed + control cells) paired with control inputs, re-drawn per epoch.

    ``X``: cells × genes (dense or CSR), normalised + log1p. ``target_idx``: rows used as
    targets; ``pert_cols[i]``: perturbed columns of target ``i`` (empty for controls);
    ``control_idx``: rows that can be drawn as inputs. Control targets use themselves as
    input (GEARS).
    """

    def __init__(
        self,
        X: Any,
        *,
        target_idx: np.ndarray,
        pert_cols: Sequence[np.ndarray],
        control_idx: np.ndarray,
        keys: np.ndarray,
        seed: int = 0,
    ) -> None:
        if len(control_idx) == 0:
            raise InputError(
                "no control cells to pair with: the training split needs cells with "
                "condition 'ctrl'; check obs['condition'] and re-run 'celltune perturb prepare'"
            )
        if len(target_idx) != len(pert_cols):
            raise ValueError("target_idx and pert_cols must have the same length")
        # CSR, dense, or rows read on demand (``StreamedRows``, ``perturb train --stream``)
        self.X = X.tocsr() if sp.issparse(X) else X if hasattr(X, "source") else np.asarray(X)
        self.target_idx = np.asarray(target_idx, dtype=np.int64)
        self.pert_cols = [np.asarray(p, dtype=np.int64) for p in pert_cols]
        self.control_idx = np.asarray(control_idx, dtype=np.int64)
        self.keys = np.asarray(keys, dtype=np.int64)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the control partners (call at the start of every epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.target_idx)

    def partner(self, item: int) -> int:
        """Row index of the control input of target ``item`` in the current epoch."""
        row = int(self.target_idx[item])
        if len(self.pert_cols[item]) == 0:
            return row  # control: input = target (GEARS)
        rng = cell_rng(self.seed, self.epoch, int(self.keys[row]), _STREAM_PAIR)
        return int(self.control_idx[rng.integers(len(self.control_idx))])

    def __getitem__(self, item: int) -> PairedItem:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[int]) -> list[PairedItem]:
        """A mini-batch: its target and partner rows read in one go (sorted, unique), so a
        streamed source reads only the rows this batch needs."""
        rows = [int(self.target_idx[i]) for i in items]
        ctrls = [self.partner(i) for i in items]
        need = np.unique(np.asarray(rows + ctrls, dtype=np.int64))
        block = self.X[need]
        dense = np.asarray(
            block.toarray() if sp.issparse(block) else block, dtype=np.float32
        ).reshape(len(need), -1)
        at = {int(r): j for j, r in enumerate(need)}
        out = []
        for i, row, ctrl in zip(items, rows, ctrls, strict=True):
            target = dense[at[row]].copy()
            control = target if ctrl == row else dense[at[ctrl]].copy()
            out.append(
                PairedItem(
                    index=row,
                    key=int(self.keys[row]),
                    control=control,
                    target=target,
                    pert_cols=self.pert_cols[i],
                )
            )
        return out


class PerturbationCollator:
    """Turn :class:`PairedItem` lists into padded model inputs.

    Output tensors: ``gene_ids`` (B, L) vocabulary ids, ``values`` (B, L) control input,
    ``target_values`` (B, L), ``pert_flags`` (B, L) (1 perturbed, 0 not, ``pert_pad_id`` on
    padding), ``padding_mask`` (B, L) True at padding, ``cell_index`` (B,).
    """

    def __init__(
        self,
        *,
        gene_ids: np.ndarray,
        pad_id: int,
        pad_value: float = 0.0,
        pert_pad_id: int = 2,
        include_zero_gene: IncludeZero = "all",
        max_seq_len: int = 1536,
        seed: int = 0,
        n_measured: int | None = None,
    ) -> None:
        if include_zero_gene not in INCLUDE_ZERO_CHOICES:
            raise InputError(
                f"include_zero_gene must be one of {list(INCLUDE_ZERO_CHOICES)}, got "
                f"{include_zero_gene!r}"
            )
        if max_seq_len < 1:
            raise InputError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.gene_ids = np.asarray(gene_ids, dtype=np.int64)
        self.n_measured = len(self.gene_ids) if n_measured is None else int(n_measured)
        # token-only columns (unmeasured perturbed genes) enter a sequence only when flagged
        self.candidate_cols = np.flatnonzero(self.gene_ids[: self.n_measured] >= 0)
        self.pad_id = int(pad_id)
        self.pad_value = float(pad_value)
        self.pert_pad_id = int(pert_pad_id)
        self.include_zero_gene = include_zero_gene
        self.max_seq_len = int(max_seq_len)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Gene sub-samples are re-drawn per epoch, like the control partners."""
        self.epoch = int(epoch)

    def positions(self, item: PairedItem) -> np.ndarray:
        """The columns of ``item``'s sequence (perturbed columns always included)."""
        rng = cell_rng(self.seed, self.epoch, item.key, _STREAM_GENES)
        return select_gene_positions(
            item.control,
            item.pert_cols,
            candidate_cols=self.candidate_cols,
            include_zero_gene=self.include_zero_gene,  # type: ignore[arg-type]
            max_seq_len=self.max_seq_len,
            rng=rng,
        )

    def __call__(self, items: list[PairedItem]) -> dict[str, torch.Tensor]:
        cols = [self.positions(it) for it in items]
        return build_batch(
            [it.control for it in items],
            [it.target for it in items],
            cols,
            [it.pert_cols for it in items],
            gene_ids=self.gene_ids,
            pad_id=self.pad_id,
            pad_value=self.pad_value,
            pert_pad_id=self.pert_pad_id,
            cell_index=[it.index for it in items],
            n_measured=self.n_measured,
        )


class EpochShuffle(torch.utils.data.Sampler[list[int]]):
    """Seeded per-epoch shuffled mini-batches: an uninterrupted and a resumed run see the
    same order, and ``set_epoch`` re-draws the control partners and gene subsets too.

    With ``world > 1`` the shuffle cuts global batches of ``batch_size * world`` cells and
    rank ``rank`` takes every ``world``-th cell of each (disjoint shares, one global order
    for all ranks); a last global batch too small to give every rank a cell is dropped,
    since a rank without a batch would stall the others in DDP's gradient all-reduce."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        followers: Sequence[Any],
        *,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.followers = list(followers)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for f in self.followers:
            f.set_epoch(epoch)

    def _global_batches(self) -> list[tuple[int, int]]:
        step = self.batch_size * self.world
        return [
            (i, min(i + step, self.n)) for i in range(0, self.n, step) if self.n - i >= self.world
        ]

    def __len__(self) -> int:
        return len(self._global_batches())

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        for start, stop in self._global_batches():
            yield order[start:stop][self.rank :: self.world].tolist()


def build_batch(
    controls: Sequence[np.ndarray],
    targets: Sequence[np.ndarray] | None,
    cols: Sequence[np.ndarray],
    pert_cols: Sequence[np.ndarray],
    *,
    gene_ids: np.ndarray,
    pad_id: int,
    pad_value: float,
    pert_pad_id: int,
    cell_index: Sequence[int] | None = None,
    n_measured: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad per-cell column lists into (B, L) tensors; shared by training and inference.

    ``target_mask`` (B, L) marks the positions scored by the loss: not padding and a
    measured gene (columns ``>= n_measured`` are flag-carrying tokens of unmeasured
    perturbed genes, whose expression is unknown).
    """
    B = len(cols)
    L = max(len(c) for c in cols)
    g = np.full((B, L), pad_id, dtype=np.int64)
    v = np.full((B, L), pad_value, dtype=np.float32)
    t = np.full((B, L), pad_value, dtype=np.float32)
    f = np.full((B, L), pert_pad_id, dtype=np.int64)
    pad = np.ones((B, L), dtype=bool)
    col_idx = np.full((B, L), -1, dtype=np.int64)
    for b, c in enumerate(cols):
        n = len(c)
        g[b, :n] = gene_ids[c]
        v[b, :n] = controls[b][c]
        if targets is not None:
            t[b, :n] = targets[b][c]
        f[b, :n] = np.isin(c, pert_cols[b]).astype(np.int64)
        pad[b, :n] = False
        col_idx[b, :n] = c
    measured = col_idx < (len(gene_ids) if n_measured is None else n_measured)
    out = {
        "target_mask": torch.from_numpy(~pad & measured),
        "gene_ids": torch.from_numpy(g),
        "values": torch.from_numpy(v),
        "pert_flags": torch.from_numpy(f),
        "padding_mask": torch.from_numpy(pad),
        "col_index": torch.from_numpy(col_idx),
    }
    if targets is not None:
        out["target_values"] = torch.from_numpy(t)
    if cell_index is not None:
        out["cell_index"] = torch.as_tensor(np.asarray(cell_index, dtype=np.int64))
    return out


def inference_chunks(
    n_cols: np.ndarray, pert_cols: np.ndarray, max_seq_len: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split all candidate columns into sequences of at most ``max_seq_len`` for prediction.

    Every chunk carries the perturbed columns, so each gene gets exactly one prediction per
    control cell while each sequence looks like a training sequence (same length bound, flag
    present). One chunk when the gene list fits.
    """
    pert_cols = np.unique(np.asarray(pert_cols, dtype=np.int64))
    rest = np.setdiff1d(np.asarray(n_cols, dtype=np.int64), pert_cols)
    room = max_seq_len - len(pert_cols)
    if room < 1:
        raise InputError(
            f"{len(pert_cols)} perturbed genes leave no room in max_seq_len={max_seq_len}; "
            "raise --max-seq-len"
        )
    if len(rest) <= room:
        return [np.sort(np.concatenate([pert_cols, rest]))]
    rest = rng.permutation(rest)
    n_chunks = int(np.ceil(len(rest) / room))
    return [np.sort(np.concatenate([pert_cols, part])) for part in np.array_split(rest, n_chunks)]
