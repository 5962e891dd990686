"""Annotation workflows behind the CLI: train, predict (+ automatic evaluation when the
query has labels), evaluate, map. They live in the report layer because they combine
``tasks.annotation`` with ``eval.annotation`` and the report writers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celltune.errors import InputError
from celltune.files import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from anndata import AnnData

    from celltune.eval.annotation import AnnotationScores

logger = logging.getLogger(__name__)


def report_dir_for(out_h5ad: str | Path) -> Path:
    """``OUT.h5ad`` → ``OUT_report/`` (where predict's automatic evaluation goes)."""
    p = Path(out_h5ad)
    return p.with_name(p.stem + "_report")


def evaluate_predictions(
    adata: AnnData,
    label_key: str,
    out_dir: str | Path,
    *,
    pred_key: str = "celltune_label",
    classes: list[str] | None = None,
    title: str = "celltune annotation",
) -> AnnotationScores:
    """Score ``obs[pred_key]`` against ``obs[label_key]``; writes ``metrics.json``,
    ``per_class.csv``, ``confusion.csv``, ``confusion.png`` and ``report.html``."""
    from celltune.data import io
    from celltune.eval.annotation import score_annotation
    from celltune.report.annotation_plots import plot_confusion
    from celltune.report.html import Section, write_report
    from celltune.tasks.annotation.data import labelled_cells

    labelled_cells(adata, label_key, "evaluation (--label-key)")  # names the columns
    truth = adata.obs[label_key]
    pred = io.require_obs_column(adata, pred_key, "evaluation (predicted labels)")
    if classes is None:
        classes = list(adata.uns.get("celltune", {}).get("annotation", {}).get("classes", []))
    if not classes:
        raise InputError(
            "the reference's classes are unknown (no uns['celltune']['annotation']['classes']):"
            " evaluate a file written by 'celltune annotate predict' or 'celltune map'"
        )
    scores = score_annotation(truth, pred, classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", scores.summary())
    write_text_atomic(out / "per_class.csv", scores.per_class.to_csv())
    write_text_atomic(out / "confusion.csv", scores.confusion.to_csv())
    png = plot_confusion(scores.confusion, out / "confusion.png", title)
    notes = [
        f"Accuracy {scores.accuracy:.3f}, macro-F1 {scores.macro_f1:.3f} over "
        f"{scores.n_scored:,} cells whose label the reference knows; 'unknown' counts as wrong "
        f"({scores.n_unknown:,} cells).",
    ]
    if scores.n_unlabelled:
        notes.append(f"{scores.n_unlabelled:,} cells without a label (NaN) are not scored.")
    for lab, info in scores.query_only.items():
        notes.append(
            f"Label {lab!r} ({info['n']:,} cells) is not in the reference: not scored; "
            f"predicted as {info['predicted_as']}."
        )
    sections = [
        Section("Summary", notes),
        Section(
            "Per-class precision, recall, F1", tables=[scores.per_class.rename_axis("cell type")]
        ),
        Section("Confusion matrix", images=[png], captions=["rows: true; row-normalised"]),
    ]
    write_report(out / "report.html", title, sections, meta=f"labels: obs[{label_key!r}]")
    logger.info("evaluation written to %s (macro-F1 %.3f)", out, scores.macro_f1)
    return scores


def run_predict(
    query_path: str | Path,
    model_dir: str | Path,
    out_path: str | Path,
    *,
    label_key: str | None = None,
    **kwargs: Any,
) -> tuple[AnnData, AnnotationScores | None]:
    """``celltune annotate predict``: label the query, write it, evaluate when it has labels."""
    from celltune.data import io
    from celltune.tasks.annotation import predict_labels

    query = io.read_h5ad(query_path)
    out = predict_labels(query, model_dir, **kwargs)
    io.write_h5ad(out, out_path)
    key = label_key or model_label_key(model_dir)
    scores = None
    if key is not None and key in out.obs.columns:
        scores = evaluate_predictions(out, key, report_dir_for(out_path))
    return out, scores


def model_label_key(model_dir: str | Path) -> str | None:
    """The label column the model was trained on (used to evaluate automatically)."""
    import json

    p = Path(model_dir) / "celltune_task.json"
    return json.loads(p.read_text(encoding="utf-8")).get("label_key") if p.is_file() else None
