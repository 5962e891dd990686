"""celltune.model layer (see docs/ARCHITECTURE.md): the scGPT-architecture model and its files."""

from celltune.model.checkpoint import (
    LoadReport,
    load_model,
    load_weights,
    read_state_dict,
    save_model,
)
from celltune.model.config import ModelConfig
from celltune.model.model import CellTransformer

__all__ = [
    "CellTransformer",
    "LoadReport",
    "ModelConfig",
    "load_model",
    "load_weights",
    "read_state_dict",
    "save_model",
]
