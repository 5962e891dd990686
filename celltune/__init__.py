"""celltune: fine-tune scGPT-architecture single-cell transformers.

The public Python API is scanpy-like: functions that take and return AnnData, plus a few
small classes. Submodules are imported lazily so that ``import celltune`` stays fast;
``dir(celltune)`` and ``help(celltune)`` list the public names (``celltune.__all__``).

Logging: celltune logs through the ``celltune`` logger and adds no handler of its own,
so from Python nothing is printed until logging is configured. ``celltune.set_verbosity(
"info")`` adds one stderr handler to the ``celltune`` logger (the command line does the
same)::

    import celltune
    celltune.set_verbosity("info")   # "debug", "info", "warning" (default), "error"
    result = celltune.run_integrate(adata, config, "runs/demo")
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


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def set_verbosity(level: str | int = "info") -> None:
    """Show celltune's log messages at ``level`` and above on stderr.

    ``level`` is ``"debug"``, ``"info"``, ``"warning"``, ``"error"`` (or a ``logging``
    level number). The first call adds a stderr handler to the ``celltune`` logger (time,
    level, logger, message); later calls only change the level. An application that
    configures :mod:`logging` itself needs no call: celltune's records propagate to it.
    """
    import logging

    if isinstance(level, str):
        if level.lower() not in _LEVELS:
            raise ValueError(f"level must be one of {', '.join(_LEVELS)} (got {level!r})")
        level = _LEVELS[level.lower()]
    log = logging.getLogger("celltune")
    log.setLevel(level)
    if not any(getattr(h, "_celltune", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        handler._celltune = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False  # one line per record, not one more through the root logger


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'celltune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted([*_API, "set_verbosity", "__version__"])


def __dir__() -> list[str]:
    """The public API (``__all__``) and the module's dunder attributes."""
    return sorted({n for n in globals() if n.startswith("__")} | set(__all__))
