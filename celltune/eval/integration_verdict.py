"""A plain-words verdict on an integration run, computed from its ``metrics.json``.

The scIB table is hard to read for a new user; the question they have is "did
fine-tuning help, compared with doing nothing (PCA) and with Harmony?". The verdict
answers that from the aggregates (scIB bio / batch / total) and says what to try when
celltune loses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["integration_verdict"]

#: Differences below this are called "about the same" (run-to-run spread of scIB
#: aggregates over seeds on the Kang files is of this order).
TIE = 0.01

_TRY = (
    "Try: a longer training budget (--time-budget or more --epochs), a smaller model for "
    "small data, --set tokens.include_zero_gene=false, or start from a pretrained model "
    "(--pretrained); until then use the PCA or Harmony embedding stored next to it."
)


def _score(metrics: Mapping[str, Any], method: str, key: str) -> float | None:
    row = metrics.get(method)
    if not isinstance(row, Mapping) or key not in row:
        return None
    value = row[key]
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _compare(a: float, b: float) -> str:
    if a > b + TIE:
        return "better"
    if a < b - TIE:
        return "worse"
    return "about the same"


def integration_verdict(metrics: Mapping[str, Any]) -> str:
    """Sentences comparing celltune with unintegrated PCA and Harmony (when present).

    ``metrics`` is ``metrics.json`` as a dict: ``{method: {metric: value}}``, a skipped
    method holding ``{"skipped": reason}``.
    """
    total = _score(metrics, "celltune", "scib_total")
    if total is None:
        why = metrics.get("celltune", {}).get("skipped", "no scIB metrics were computed")
        return f"No verdict: {why}."
    bio, batch = _score(metrics, "celltune", "scib_bio"), _score(metrics, "celltune", "scib_batch")
    parts: list[str] = []
    worse_than_pca = False
    for ref, name in (("pca", "unintegrated PCA"), ("harmony", "Harmony")):
        r_total = _score(metrics, ref, "scib_total")
        if r_total is None:
            continue
        r_bio, r_batch = _score(metrics, ref, "scib_bio"), _score(metrics, ref, "scib_batch")
        mix = _compare(batch, r_batch) if batch is not None and r_batch is not None else "?"
        sep = _compare(bio, r_bio) if bio is not None and r_bio is not None else "?"
        overall = _compare(total, r_total)
        mix_txt = {
            "better": "mixes batches better than",
            "worse": "mixes batches less well than",
            "about the same": "mixes batches about as well as",
        }.get(mix, "")
        sep_txt = {
            "better": "separates cell types better",
            "worse": "separates cell types less well",
            "about the same": "separates cell types about as well",
        }.get(sep, "")
        parts.append(
            f"Compared with {name}, celltune {mix_txt} it and {sep_txt}; overall scIB total "
            f"{total:.3f} vs {r_total:.3f} ({overall})."
        )
        if ref == "pca" and (
            total < r_total - TIE
            or (batch is not None and r_batch is not None and batch <= r_batch)
        ):
            worse_than_pca = True
    if not parts:
        return f"celltune scIB total {total:.3f}; no baseline was computed to compare with."
    if worse_than_pca:
        parts.append(
            "celltune's embedding does NOT improve on doing nothing (unintegrated PCA) here. "
            + _TRY
        )
    return " ".join(parts)
