"""Batch-integration fine-tuning: scGPT's ``finetune_integration.py`` as a function.

:func:`integrate` checks the input, preprocesses (SPEC §1), builds or reuses a
vocabulary, holds out a seeded, batch-stratified validation set, fine-tunes with the full
integration objective (SPEC §4) through the one training loop
(:class:`celltune.train.Trainer`), and embeds every cell, from an AnnData in memory or,
with ``data.stream`` (``--stream``), from a file on disk (:func:`integrate_file`).
:func:`embed` / :func:`embed_file` give embeddings from any model directory.

Evaluation (scIB metrics, baselines, plots, report) belongs to layers to the right of
``tasks`` (see ``docs/ARCHITECTURE.md``); the ``celltune integrate`` command chains them
(``celltune.report.integration_run.run_integrate`` is the Python equivalent of the command).

The package, by what each file holds:

- ``config.py``: :class:`IntegrationConfig` (``config.yaml``) and :class:`IntegrationResult`;
- ``checks.py``: input checks and the seeded, batch-stratified split;
- ``model.py``: the model, its objective and forward;
- ``train.py``: steps shared by every source (config, pretrained, collators, training);
- ``rundir.py``: the run directory (``--out`` checks, lock, resume) and the model dir;
- ``inputs.py``: what the workflow asks of its data (:class:`RunInputs`);
- ``memory.py`` / ``stream.py``: those answers for an AnnData / a file on disk;
- ``workflow.py``: :func:`integrate`, the one workflow;
- ``embed.py``: model directories, tokenisation, embedding loaders into arrays;
- ``embed_data.py``: :func:`embed` and :func:`embed_file`.
"""

from __future__ import annotations

from celltune.tasks.integration.checks import (
    _batch_categories,
    _gene_names,
    _subsample_cells,
    check_batch_counts,
    check_integration_input,
    stratified_split,
)
from celltune.tasks.integration.config import (
    _RESUME_MAY_CHANGE,
    EMBEDDING_KEY,
    KNOWN_BASELINES,
    SPLIT_KEY,
    TASK_FILE,
    DataSection,
    EvalSection,
    IntegrationConfig,
    IntegrationResult,
    ModelSection,
    ObjectiveSection,
    TokenSection,
)
from celltune.tasks.integration.embed import (
    EMBEDDING_FILE,
    _read_task_file,
    embed_cells,
    embed_into,
    embedding_batch_categories,
    embedding_collator,
    load_embedding_model,
    resolve_embed_device,
)
from celltune.tasks.integration.embed_data import embed, embed_file
from celltune.tasks.integration.model import _batch_labels_for, _build_model, _forward, _objective
from celltune.tasks.integration.rundir import _check_resume, _write_model_dir, open_run_dir
from celltune.tasks.integration.train import (
    collators,
    load_pretrained,
    preprocess_config,
    resolve_config,
    task_record,
    train_integration_model,
)
from celltune.tasks.integration.workflow import integrate, integrate_file

__all__ = [
    "EMBEDDING_FILE",
    "EMBEDDING_KEY",
    "KNOWN_BASELINES",
    "SPLIT_KEY",
    "TASK_FILE",
    "DataSection",
    "EvalSection",
    "IntegrationConfig",
    "IntegrationResult",
    "ModelSection",
    "ObjectiveSection",
    "TokenSection",
    "check_batch_counts",
    "check_integration_input",
    "collators",
    "embed",
    "embed_cells",
    "embed_file",
    "embed_into",
    "embedding_batch_categories",
    "embedding_collator",
    "integrate",
    "integrate_file",
    "load_embedding_model",
    "load_pretrained",
    "open_run_dir",
    "preprocess_config",
    "resolve_config",
    "resolve_embed_device",
    "stratified_split",
    "task_record",
    "train_integration_model",
]

# Kept importable for code written against the single-module layout.
_ = (
    _RESUME_MAY_CHANGE,
    _batch_categories,
    _batch_labels_for,
    _build_model,
    _check_resume,
    _forward,
    _gene_names,
    _objective,
    _read_task_file,
    _subsample_cells,
    _write_model_dir,
)
