"""Perturbation response prediction: train / predict (SPEC §6–7, issue 5).

scGPT's perturbation fine-tuning (``TransformerGenerator``) as a tool: a control cell's
expression goes in with a flag on the perturbed genes, the perturbed expression comes out.
What differs from the reference, and why:

- the perturbed genes are always inside a cut sequence (scGPT issue #298);
- the model is selected on validation ``pearson_delta`` (absolute Pearson is ~0.99 for any
  model that copies its input, so it cannot tell models apart);
- predictions are clipped at 0 (log-expression cannot be negative; GEARS issue #30);
- a perturbed gene that is not measured (not in ``var``; e.g. 16 of Papalexi's 25 targets)
  has no input position for its flag. With ``data.unmeasured_targets="token"`` (default) it
  is appended as one extra token (its gene id, value 0, flag 1) that is never scored, so
  its cells still train the model; ``"exclude"`` leaves such perturbations out of the
  model's training (counted in ``run.json``). A gene that is neither measured nor flagged
  in training has an untrained embedding: predictions for it are reported, with a warning.

Evaluation (metrics, baselines, plots) sits to the right of ``tasks`` and lives in
``celltune.report.perturbation_run.evaluate_perturbation_run``.

Layout of the package (import from ``celltune.tasks.perturbation``; every public name is
re-exported here):

- ``config``: ``PerturbConfig`` (``data`` / ``model`` / ``train``), ``load_perturb_config``;
- ``pairing``: control pairing, perturbation flags and tokenisation (pure, unit-tested);
- ``data``: ``check_prepared``, ``resolve_data`` → ``PerturbationData`` (prepared file
  resolved against the model's gene list);
- ``model``: the perturbation-flag transformer, from scratch or ``--pretrained``;
- ``train``: ``train_perturbation_model`` in steps; ``validation``: validation cells and metrics;
- ``predict``: ``predict_cells`` (core), ``predict_perturbations``, ``write_prediction_csv``;
- ``rundir``: the run directory (``DIR/model``, ``config.yaml``, ``controls.h5ad``,
  ``run.json``, ...) and ``load_run``.
"""

from celltune.tasks.perturbation.config import (
    CTRL,
    PRETRAINED_PREFIXES,
    SELECT_METRIC,
    PerturbConfig,
    PerturbDataConfig,
    PerturbModelConfig,
    load_perturb_config,
)
from celltune.tasks.perturbation.data import PerturbationData, check_prepared, resolve_data
from celltune.tasks.perturbation.pairing import (
    INCLUDE_ZERO_CHOICES,
    PairedItem,
    PerturbationCollator,
    PerturbationPairs,
    build_batch,
    cell_rng,
    inference_chunks,
    select_gene_positions,
    stable_cell_keys,
)
from celltune.tasks.perturbation.predict import (
    Prediction,
    predict_cells,
    predict_perturbations,
    write_prediction_csv,
)
from celltune.tasks.perturbation.rundir import LoadedRun, load_run
from celltune.tasks.perturbation.train import PerturbationRun, train_perturbation_model

__all__ = [
    "CTRL",
    "INCLUDE_ZERO_CHOICES",
    "PRETRAINED_PREFIXES",
    "SELECT_METRIC",
    "LoadedRun",
    "PairedItem",
    "PerturbConfig",
    "PerturbDataConfig",
    "PerturbModelConfig",
    "PerturbationCollator",
    "PerturbationData",
    "PerturbationPairs",
    "PerturbationRun",
    "Prediction",
    "build_batch",
    "cell_rng",
    "check_prepared",
    "inference_chunks",
    "load_perturb_config",
    "load_run",
    "predict_cells",
    "predict_perturbations",
    "resolve_data",
    "select_gene_positions",
    "stable_cell_keys",
    "train_perturbation_model",
    "write_prediction_csv",
]
