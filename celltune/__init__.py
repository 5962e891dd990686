"""celltune: fine-tune scGPT-architecture single-cell transformers.

The public Python API is scanpy-like: functions that take and return AnnData, plus a few
small classes. Submodules are imported lazily so that ``import celltune`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "preprocess": "celltune.data.preprocess",
    "PreprocessConfig": "celltune.data.preprocess",
    "GeneVocab": "celltune.data.vocab",
    "read_h5ad": "celltune.data.io",
    "load_model": "celltune.model.checkpoint",
    "save_model": "celltune.model.checkpoint",
    "ModelConfig": "celltune.model.config",
    "CellTransformer": "celltune.model.model",
    "integrate": "celltune.tasks.integration",
    "embed": "celltune.tasks.integration",
    "IntegrationConfig": "celltune.tasks.integration",
    "integrate_file": "celltune.tasks.integration",
    "embed_file": "celltune.tasks.integration",
    "run_integrate": "celltune.report.integration_run",
    "train_perturbation_model": "celltune.tasks.perturbation",
    "predict_perturbations": "celltune.tasks.perturbation",
    "evaluate_perturbation_run": "celltune.report.perturbation_run",
    "prepare_perturbation_data": "celltune.data.gears",
}


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'celltune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_API)
