"""Self-supervised pretraining (``celltune pretrain``) on one or many files, streamed.

- ``config.py``: :class:`PretrainConfig`, integration's config tree with label-free
  defaults and a ``pretrain`` section;
- ``genes.py``: the vocabulary (union / ``--vocab`` / ``--init`` extended) and the checks
  that name wrong gene sets;
- ``inputs.py``: the files, their split and interleaved streamed loaders;
- ``workflow.py``: :func:`pretrain`.
"""

from __future__ import annotations

from celltune.tasks.pretrain.config import PretrainConfig, PretrainSection
from celltune.tasks.pretrain.genes import build_vocab, name_kind
from celltune.tasks.pretrain.inputs import InterleavedLoader
from celltune.tasks.pretrain.workflow import MODEL_DIR, PretrainResult, pretrain

__all__ = [
    "MODEL_DIR",
    "InterleavedLoader",
    "PretrainConfig",
    "PretrainResult",
    "PretrainSection",
    "build_vocab",
    "name_kind",
    "pretrain",
]
