"""Prediction: a control cell with flags on the perturbed genes in, expression out.

``predict_cells`` is the core (used by validation, ``predict`` and ``evaluate``);
``predict_perturbations`` averages it over the control pool of a trained run.
Predictions are clipped at 0 (log-expression cannot be negative; GEARS issue #30).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from celltune.errors import InputError
from celltune.files import atomic_path
from celltune.tasks.perturbation.config import CTRL
from celltune.tasks.perturbation.model import forward
from celltune.tasks.perturbation.pairing import build_batch, inference_chunks
from celltune.tasks.perturbation.rundir import LoadedRun, load_run

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_cells(
    model: torch.nn.Module,
    controls: np.ndarray,
    gene_ids: np.ndarray,
    pert_cols: np.ndarray,
    *,
    max_seq_len: int,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    n_measured: int | None = None,
    include_zero_gene: str = "all",
) -> np.ndarray:
    """Predicted expression (n_controls, n_measured) for one perturbation, clipped at 0.

    Each control cell is run with flags on ``pert_cols``; gene lists longer than
    ``max_seq_len`` are covered in chunks that all carry the perturbed genes. Columns
    ``>= n_measured`` of ``gene_ids`` are token-only (unmeasured perturbed genes): they
    enter a sequence only when flagged and are not returned.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = model.config
    G = len(gene_ids)
    n_measured = G if n_measured is None else int(n_measured)
    controls = np.asarray(controls, dtype=np.float32)
    n = controls.shape[0]
    if controls.shape[1] < G:  # token-only columns carry value 0
        controls = np.hstack([controls, np.zeros((n, G - controls.shape[1]), np.float32)])
    cols_all = np.flatnonzero(gene_ids[:n_measured] >= 0)
    rng = np.random.default_rng(seed)
    # jobs: (control row, sequence columns). "all": every measured gene, chunked; "nonzero":
    # as in training, the genes expressed in that control (+ the flags); genes left out
    # keep their input value (0: not expressed in the control stays unexpressed).
    if include_zero_gene == "nonzero":
        jobs = [
            (i, chunk)
            for i in range(n)
            for chunk in inference_chunks(
                cols_all[controls[i, cols_all] != 0], pert_cols, max_seq_len, rng
            )
        ]
    else:
        chunks = inference_chunks(cols_all, pert_cols, max_seq_len, rng)
        jobs = [(i, chunk) for chunk in chunks for i in range(n)]
    out = controls.copy()
    was_training = model.training
    model.eval()
    ctx = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        for start in range(0, len(jobs), batch_size):
            part = jobs[start : start + batch_size]
            batch = build_batch(
                [controls[i] for i, _ in part],
                None,
                [c for _, c in part],
                [pert_cols] * len(part),
                gene_ids=gene_ids,
                pad_id=cfg.pad_id,
                pad_value=float(cfg.pad_value),
                pert_pad_id=cfg.pert_pad_id,
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            with ctx:
                pred = forward(model, batch).float().clamp_min(0).cpu().numpy()
            for b, (i, c) in enumerate(part):
                out[i, c] = pred[b, : len(c)]
    finally:
        model.train(was_training)
    return out[:, :n_measured]


def parse_request(text: str) -> tuple[str, tuple[str, ...]]:
    """``"FEV"``, ``"FEV+ctrl"``, ``"FEV+SAMD11"`` → GEARS condition and its genes."""
    parts = [p.strip() for p in str(text).split("+") if p.strip()]
    genes = tuple(p for p in parts if p != CTRL)
    if not genes or len(genes) > 2 or len(set(genes)) != len(genes):
        raise InputError(
            f"perturbation {text!r} is not a gene, 'GENE+ctrl' or 'GENEA+GENEB'; give one or "
            "two distinct gene symbols joined by '+'"
        )
    cond = f"{genes[0]}+{CTRL}" if len(genes) == 1 else f"{genes[0]}+{genes[1]}"
    return cond, genes


@dataclass
class Prediction:
    """Mean and per-cell spread of predicted expression per perturbation."""

    genes: np.ndarray
    mean: pd.DataFrame  # perturbations × genes
    std: pd.DataFrame
    control_mean: np.ndarray
    n_ctrl: int

    def to_long(self) -> pd.DataFrame:
        """Tidy table: perturbation, gene, mean, std, control_mean, delta."""
        frames = []
        for cond in self.mean.index:
            m = self.mean.loc[cond].to_numpy()
            frames.append(
                pd.DataFrame(
                    {
                        "perturbation": cond,
                        "gene": self.genes,
                        "mean": m,
                        "std": self.std.loc[cond].to_numpy(),
                        "control_mean": self.control_mean,
                        "delta": m - self.control_mean,
                        "n_ctrl": self.n_ctrl,
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


def predict_perturbations(
    run: LoadedRun | str | os.PathLike[str],
    perturbations: Sequence[str],
    *,
    n_ctrl: int = 300,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 64,
    quiet: bool = True,
) -> Prediction:
    """Predict single / combination perturbations, averaged over ``n_ctrl`` control cells.

    Genes outside the model's gene list are rejected by name before anything runs.
    """
    lr = run if isinstance(run, LoadedRun) else load_run(run, device=device)
    if not perturbations:
        raise InputError("no perturbations given; e.g. --perturbations FEV 'FEV+SAMD11'")
    if n_ctrl < 1:
        raise InputError(f"--n-ctrl must be >= 1, got {n_ctrl}")
    requests = [parse_request(p) for p in perturbations]
    unknown = [
        g for _, gs in requests for g in gs if g not in set(lr.genes) and g not in lr.model.vocab
    ]
    if unknown:  # all unknown genes named at once, before anything runs
        lr.flag_inputs(unknown)
    flags = [lr.flag_inputs(g) for _, g in requests]
    n = min(n_ctrl, len(lr.controls))
    if n < n_ctrl:
        logger.warning("only %d control cells stored with the run; using all of them", n)
    pick = np.sort(np.random.default_rng([seed, 23]).choice(len(lr.controls), n, replace=False))
    controls = lr.controls[pick]
    means, stds = [], []
    for ids, cols in tqdm(flags, desc="predict", disable=quiet, leave=False):
        pred = predict_cells(
            lr.model,
            controls,
            ids,
            cols,
            max_seq_len=lr.config.data.max_seq_len,
            batch_size=batch_size,
            seed=seed,
            n_measured=len(lr.genes),
            include_zero_gene=lr.config.data.include_zero_gene,
        )
        means.append(pred.mean(axis=0))
        stds.append(pred.std(axis=0))
    index = pd.Index([c for c, _ in requests], name="perturbation")
    return Prediction(
        genes=lr.genes,
        mean=pd.DataFrame(np.vstack(means), index=index, columns=lr.genes),
        std=pd.DataFrame(np.vstack(stds), index=index, columns=lr.genes),
        control_mean=lr.controls.mean(axis=0),
        n_ctrl=n,
    )


def check_prediction_out(
    path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None
) -> None:
    """Refuse an ``--out`` that is a directory or one of the run directory's own files
    (before anything is predicted)."""
    from celltune.data.validate import check_out_not_input

    p = Path(path)
    if p.is_dir():
        raise InputError(
            f"--out {p} is an existing directory; give the path of the CSV to write, e.g. "
            f"--out {p / 'prediction.csv'}"
        )
    if run_dir is not None and Path(run_dir).is_dir():
        check_out_not_input(p, [f for f in Path(run_dir).rglob("*") if f.is_file()])


def write_prediction_csv(pred: Prediction, path: str | os.PathLike[str]) -> Path:
    """Long-format CSV (atomic)."""
    check_prediction_out(path)
    with atomic_path(path) as tmp:
        pred.to_long().to_csv(tmp, index=False)
    return Path(path)
