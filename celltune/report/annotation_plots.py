"""Confusion-matrix figures for annotation (matplotlib Agg, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from celltune.files import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (each true class sums to 1), counts annotated.

    Row normalisation shows recall per class, so small classes are as visible as large ones.
    """
    plt = _pyplot()
    counts = confusion.to_numpy(dtype=float)
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n_r, n_c = counts.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n_c, 1.0 + 0.6 * n_r))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n_r):
        for j in range(n_c):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    f"{int(counts[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if frac[i, j] > 0.6 else "black",
                )
    ax.set_xticks(range(n_c), [str(c) for c in confusion.columns], rotation=45, ha="right")
    ax.set_yticks(range(n_r), [str(c) for c in confusion.index])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
