"""Cell-type annotation (scGPT's CLS fine-tuning) and reference mapping (kNN label
transfer in a model's embedding space).

``train_annotation`` fine-tunes on a labelled reference through the one training loop;
``predict_labels`` labels a query with the fine-tuned CLS head; ``map_labels`` transfers
labels from a reference by nearest neighbours in the embedding of any model directory.
Evaluation and baselines live in :mod:`celltune.eval.annotation`; the command-line
workflows in :mod:`celltune.report.annotation_run`.
"""

from celltune.tasks.annotation.config import AnnotationConfig
from celltune.tasks.annotation.predict import (
    CONFIDENCE_KEY,
    LABEL_KEY,
    PROBA_KEY,
    UNKNOWN,
    map_labels,
    predict_labels,
)
from celltune.tasks.annotation.train import AnnotationResult, train_annotation

__all__ = [
    "CONFIDENCE_KEY",
    "LABEL_KEY",
    "PROBA_KEY",
    "UNKNOWN",
    "AnnotationConfig",
    "AnnotationResult",
    "map_labels",
    "predict_labels",
    "train_annotation",
]
