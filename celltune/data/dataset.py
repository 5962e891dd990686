"""Cells → padded token batches (SPEC §2): a lazy ``Dataset`` plus a per-mini-batch collator.

Tokenising per mini-batch (not up front) keeps memory at O(nnz) and lets every epoch draw
new masks. All per-cell randomness (gene sub-sampling when a cell is longer than
``max_seq_len``, masking) comes from ``np.random.default_rng([seed, epoch, cell_key])``,
so a cell gets the same draws whatever mini-batch, worker or rank it lands in.

Masking convention: by default the ``<cls>`` position is never masked and
``n = number of gene positions`` (non-padding, non-``<cls>``); ``floor(mask_ratio * n)``
of them are masked. ``mask_cls=True`` makes ``<cls>`` a candidate and counts it in ``n``,
which reproduces scGPT's ``random_mask_value``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from celltune.data import io
from celltune.data.binning import cell_keys
from celltune.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

#: Guards floor(mask_ratio * n) against products like 0.29 * 100 = 28.999999999999996.
_FLOOR_EPS = 1e-9


def _labels(
    adata: AnnData, key: str, categories: Sequence[Any] | None, purpose: str
) -> tuple[np.ndarray, list[Any]]:
    """Integer codes of an obs column in a fixed category order (given or the column's own)."""
    col = io.require_obs_column(adata, key, purpose)
    if categories is None:
        cat = col.astype("category")
        cats = list(cat.cat.categories)
        return np.asarray(cat.cat.codes, dtype=np.int64), cats
    cats = list(categories)
    codes = pd.Categorical(col, categories=cats).codes.astype(np.int64)
    if (codes < 0).any():
        unknown = sorted({str(v) for v in col[codes < 0]})[:10]
        raise InputError(
            f"obs column {key!r} has values not in the given categories: {unknown}; pass "
            "categories that include them (e.g. those of the training data) or drop those cells"
        )
    return codes, cats


class CellDataset(Dataset):
    """One item per cell: its non-zero row (CSR slice) and its labels; no tokenising here."""

    def __init__(
        self,
        adata: AnnData,
        gene_ids: Sequence[int] | np.ndarray,
        *,
        layer: str | None = "X_binned",
        batch_key: str | None = None,
        label_key: str | None = None,
        batch_categories: Sequence[Any] | None = None,
        label_categories: Sequence[Any] | None = None,
    ) -> None:
        if adata.n_obs == 0:
            raise InputError("the dataset has no cells; check the input or the subset")
        if layer is not None and layer not in adata.layers:
            raise InputError(
                f"layer {layer!r} not found (available: {list(adata.layers.keys())}); run "
                "'celltune preprocess' first to create X_binned, or pass layer=None to use X"
            )
        X = io.get_matrix(adata, layer)
        if hasattr(X, "to_memory"):
            X = X.to_memory()
        if sp.issparse(X):
            X = X.tocsr() if X.format != "csr" else X
        else:
            X = sp.csr_matrix(np.asarray(X))
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        if not X.has_sorted_indices:
            X = X.copy()
            X.sort_indices()
        self.X: sp.csr_matrix = X
        self.gene_ids = np.asarray(gene_ids, dtype=np.int64)
        if self.gene_ids.shape != (adata.n_vars,):
            raise InputError(
                f"gene_ids has {self.gene_ids.size:,} entries but the data have "
                f"{adata.n_vars:,} genes; pass one vocab id per var (GeneVocab.match_genes)"
            )
        if not (self.gene_ids >= 0).any():
            raise InputError(
                "no gene of the data is in the vocabulary (all gene_ids are -1); check the "
                "gene names against the model's vocab.json"
            )
        self.keys = cell_keys(adata.obs_names)
        n = adata.n_obs
        if batch_key is not None:
            self.batch_labels, self.batch_categories = _labels(
                adata, batch_key, batch_categories, "batch labels (batch_key)"
            )
        else:
            self.batch_labels = np.zeros(n, dtype=np.int64)
            self.batch_categories = []
        if label_key is not None:
            self.celltype_labels, self.label_categories = _labels(
                adata, label_key, label_categories, "cell-type labels (label_key)"
            )
        else:
            self.celltype_labels = np.full(n, -1, dtype=np.int64)
            self.label_categories = []

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    def __len__(self) -> int:
        return self.X.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        a, b = self.X.indptr[i], self.X.indptr[i + 1]
        return {
            "index": i,
            "key": int(self.keys[i]),
            "indices": self.X.indices[a:b],
            "data": self.X.data[a:b],
            "batch_label": int(self.batch_labels[i]),
            "celltype_label": int(self.celltype_labels[i]),
        }

    def collator(self, **kwargs: Any) -> TokenCollator:
        """A :class:`TokenCollator` for this dataset's genes (``cls_id``/``pad_id`` required)."""
        return TokenCollator(n_genes=self.n_genes, gene_ids=self.gene_ids, **kwargs)


class TokenCollator:
    """``collate_fn`` turning :class:`CellDataset` items into padded, masked tensors.

    ``L`` is the longest sequence of the mini-batch (``<cls>`` included), at most
    ``max_seq_len``. Genes whose id is -1 are dropped. ``mask_ratio=0`` disables masking.
    Call :meth:`set_epoch` before each epoch (with ``num_workers > 0`` and
    ``persistent_workers=False`` the workers pick up the new epoch when re-created).

    ``dense_targets=True`` adds every cell's values over all kept genes, zeros included
    (``all_values`` (B, G)) and their vocab ids (``all_gene_ids`` (G,)): the targets of a
    GEPC head that predicts every gene, whatever the tokens (``include_zero_gene=False``).
    """

    def __init__(
        self,
        *,
        n_genes: int,
        gene_ids: Sequence[int] | np.ndarray,
        cls_id: int,
        pad_id: int,
        include_zero_gene: bool = True,
        max_seq_len: int = 1201,
        pad_value: float = -2,
        cls_value: float = 0,
        mask_ratio: float = 0.4,
        mask_value: float = -1,
        mask_cls: bool = False,
        seed: int = 0,
        append_cls: bool = True,
        dense_targets: bool = False,
    ) -> None:
        self.gene_ids = np.asarray(gene_ids, dtype=np.int64)
        if self.gene_ids.shape != (n_genes,):
            raise InputError(
                f"gene_ids has {self.gene_ids.size:,} entries but n_genes={n_genes:,}; pass "
                "one vocab id per gene column"
            )
        if not 0 <= mask_ratio < 1:
            raise InputError(f"mask_ratio must be in [0, 1) (got {mask_ratio}); default 0.4")
        min_len = 2 if append_cls else 1
        if max_seq_len < min_len:
            raise InputError(
                f"max_seq_len must be at least {min_len} (got {max_seq_len}); it counts <cls>"
            )
        if cls_id == pad_id:
            raise InputError(f"cls_id and pad_id are both {cls_id}; they must differ")
        self.n_genes = int(n_genes)
        self.cls_id = int(cls_id)
        self.pad_id = int(pad_id)
        self.include_zero_gene = bool(include_zero_gene)
        self.max_seq_len = int(max_seq_len)
        self.pad_value = float(pad_value)
        self.cls_value = float(cls_value)
        self.mask_ratio = float(mask_ratio)
        self.mask_value = float(mask_value)
        self.mask_cls = bool(mask_cls)
        self.seed = int(seed)
        self.append_cls = bool(append_cls)
        self.dense_targets = bool(dense_targets)
        self.epoch = 0
        self._kept_cols = np.flatnonzero(self.gene_ids >= 0)
        self._kept_ids = self.gene_ids[self._kept_cols]

    def set_epoch(self, epoch: int) -> None:
        """New epoch → new masks and sub-samples (deterministic given seed and epoch)."""
        self.epoch = int(epoch)

    def _rng(self, key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(key)])

    def _contents(self, items: Sequence[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per cell: (vocab ids, values) of its gene tokens before sub-sampling."""
        if self.include_zero_gene:
            vals = self._dense_values(items)
            return [(self._kept_ids, vals[i]) for i in range(len(items))]
        out = []
        for it in items:
            ix = np.asarray(it["indices"], dtype=np.int64)
            v = np.asarray(it["data"], dtype=np.float32)
            ids = self.gene_ids[ix]
            keep = (v != 0) & (ids >= 0)
            ids, v, ix = ids[keep], v[keep], ix[keep]
            if ix.size > 1 and (np.diff(ix) < 0).any():  # gene order = column order
                order = np.argsort(ix, kind="stable")
                ids, v = ids[order], v[order]
            out.append((ids, v))
        return out

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        B = len(items)
        contents = self._contents(items)
        budget = self.max_seq_len - (1 if self.append_cls else 0)
        off = 1 if self.append_cls else 0
        seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        for it, (ids, vals) in zip(items, contents, strict=True):
            n = ids.size
            need_sub = n > budget
            rng = self._rng(it["key"]) if (need_sub or self.mask_ratio > 0) else None
            if need_sub:
                assert rng is not None
                sel = np.sort(rng.choice(n, budget, replace=False))
                ids, vals = ids[sel], vals[sel]
                n = budget
            masked = None
            if self.mask_ratio > 0:
                assert rng is not None
                start = 0 if (self.mask_cls or not self.append_cls) else off
                n_cand = n + off - start
                n_mask = math.floor(self.mask_ratio * n_cand + _FLOOR_EPS)
                if n_mask:
                    r = rng.random(n_cand)
                    masked = start + np.argpartition(r, n_mask - 1)[:n_mask]
            seqs.append((ids, vals, masked))

        L = max(1, max(ids.size for ids, _, _ in seqs) + off)
        gene_ids = np.full((B, L), self.pad_id, dtype=np.int64)
        target = np.full((B, L), self.pad_value, dtype=np.float32)
        if self.append_cls:
            gene_ids[:, 0] = self.cls_id
            target[:, 0] = self.cls_value
        lengths = np.empty(B, dtype=np.int64)
        for i, (ids, vals, _) in enumerate(seqs):
            gene_ids[i, off : off + ids.size] = ids
            target[i, off : off + ids.size] = vals
            lengths[i] = ids.size + off
        values = target.copy()
        for i, (_, _, masked) in enumerate(seqs):
            if masked is not None:
                values[i, masked] = self.mask_value
        padding_mask = np.arange(L)[None, :] >= lengths[:, None]
        out = {
            "gene_ids": torch.from_numpy(gene_ids),
            "values": torch.from_numpy(values),
            "target_values": torch.from_numpy(target),
            "padding_mask": torch.from_numpy(padding_mask),
            "batch_labels": torch.tensor([it["batch_label"] for it in items], dtype=torch.int64),
            "celltype_labels": torch.tensor(
                [it.get("celltype_label", -1) for it in items], dtype=torch.int64
            ),
            "cell_index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        }
        if self.dense_targets:
            out["all_values"] = torch.from_numpy(self._dense_values(items))
            out["all_gene_ids"] = torch.from_numpy(self._kept_ids.copy())
        return out

    def _dense_values(self, items: Sequence[dict[str, Any]]) -> np.ndarray:
        """(B, G) values of the kept genes, zeros included, in column order."""
        B = len(items)
        lens = [len(it["indices"]) for it in items]
        block = np.zeros((B, self.n_genes), dtype=np.float32)
        if sum(lens):
            rows = np.repeat(np.arange(B), lens)
            block[rows, np.concatenate([it["indices"] for it in items])] = np.concatenate(
                [it["data"] for it in items]
            )
        return block[:, self._kept_cols]
