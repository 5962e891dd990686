"""celltune.data: h5ad I/O and checks, preprocessing, binning, vocabulary, token batches.

See docs/ARCHITECTURE.md ("data") for the contract; ``celltune.data.gears`` (perturbation
data) is imported on its own. Names are re-exported lazily so that importing a light
submodule (or ``celltune --help``) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "bin_matrix": "binning",
    "cell_keys": "binning",
    "CellDataset": "dataset",
    "TokenCollator": "dataset",
    "check_raw_counts": "io",
    "get_matrix": "io",
    "looks_log_transformed": "io",
    "read_h5ad": "io",
    "require_obs_column": "io",
    "write_h5ad": "io",
    "PreprocessConfig": "preprocess",
    "preprocess": "preprocess",
    "BatchAwareSampler": "sampler",
    "AnnDataSource": "source",
    "CellSource": "source",
    "StoreSource": "source",
    "open_source": "source",
    "GeneMatch": "vocab",
    "GeneVocab": "vocab",
}

__all__ = [
    "BatchAwareSampler",
    "CellDataset",
    "GeneMatch",
    "GeneVocab",
    "PreprocessConfig",
    "TokenCollator",
    "bin_matrix",
    "cell_keys",
    "check_raw_counts",
    "get_matrix",
    "looks_log_transformed",
    "preprocess",
    "read_h5ad",
    "require_obs_column",
    "write_h5ad",
]

if TYPE_CHECKING:
    from celltune.data.binning import bin_matrix, cell_keys
    from celltune.data.dataset import CellDataset, TokenCollator
    from celltune.data.io import (
        check_raw_counts,
        get_matrix,
        looks_log_transformed,
        read_h5ad,
        require_obs_column,
        write_h5ad,
    )
    from celltune.data.preprocess import PreprocessConfig, preprocess
    from celltune.data.sampler import BatchAwareSampler
    from celltune.data.vocab import GeneMatch, GeneVocab


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    if name in _EXPORTS:
        module = importlib.import_module(f"celltune.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'celltune.data' has no attribute {name!r}")
