"""The run directory of ``celltune perturb train``: the control pool it stores and reopening it.

Layout (written by :func:`celltune.tasks.perturbation.train.train_perturbation_model`)::

    DIR/model/          scGPT-format model (args.json, vocab.json, best_model.pt, ...)
    DIR/config.yaml     the fully resolved configuration (reproduce / resume from it)
    DIR/history.csv     one row per epoch (train loss, val/pearson_delta, ...)
    DIR/controls.h5ad   the control-cell pool that ``predict`` averages over
    DIR/run.json        data path, gene and perturbation counts, exclusions, timings
    DIR/checkpoint.pt, DIR/best_state.pt   training loop state (resume)
    DIR/manifest.json   written last (every file, its size and SHA-256; the runs that wrote)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from celltune.errors import InputError
from celltune.files import atomic_path, check_not_in_use, verify_manifest
from celltune.tasks.perturbation.config import CTRL, PerturbConfig, load_perturb_config
from celltune.tasks.perturbation.data import PerturbationData

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


def write_controls(adata: AnnData, pdata: PerturbationData, rows: np.ndarray, path: Path) -> None:
    """The control cells ``predict`` averages over, on the model's measured genes, in order."""
    import anndata as ad

    nm = pdata.n_measured
    genes = pdata.genes[:nm].astype(str)
    obs = pd.DataFrame(index=adata.obs_names[rows].astype(str))
    obs["condition"] = CTRL
    var = pd.DataFrame({"gene_name": genes}, index=pd.Index(genes))
    sub = ad.AnnData(X=pdata.X[rows][:, :nm].copy(), obs=obs, var=var)
    with atomic_path(path) as tmp:
        sub.write_h5ad(tmp, compression="gzip")  # like every h5ad celltune writes


@dataclass
class LoadedRun:
    """A trained run directory, ready to predict."""

    out_dir: Path
    model: torch.nn.Module
    config: PerturbConfig
    info: dict[str, Any]
    genes: np.ndarray
    gene_ids: np.ndarray
    controls: np.ndarray

    @property
    def trained_genes(self) -> set[str]:
        """Genes whose flag the model saw in training (measured or as an extra token)."""
        return set(self.info.get("train_flagged_genes", []))

    def flag_inputs(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(gene_ids, pert_cols)`` for flagging ``genes``: measured genes are flagged at
        their input position; a gene of the vocabulary that is not measured becomes an
        extra token (value 0). Genes outside the vocabulary are rejected by name."""
        pos = {g: i for i, g in enumerate(self.genes)}
        vocab = self.model.vocab
        unknown = [g for g in genes if g not in pos and g not in vocab]
        if unknown:
            raise InputError(
                f"gene(s) not in the model's gene list: {', '.join(unknown)}. The model can "
                f"flag the {len(self.genes)} measured genes of {self.out_dir / 'controls.h5ad'} "
                "and genes of its vocabulary (model/vocab.json); check the spelling (gene "
                "symbols, case-sensitive)"
            )
        ids = list(self.gene_ids)
        cols = []
        for g in genes:
            if g in pos:
                cols.append(pos[g])
            else:
                cols.append(len(ids))
                ids.append(int(vocab[g]))
        untrained = [g for g in genes if g not in pos and g not in self.trained_genes]
        if untrained:
            logger.warning(
                "%s: not measured and never perturbed in training, so the model has only an "
                "untrained embedding for it; treat its prediction as a guess",
                ", ".join(untrained),
            )
        return np.asarray(ids, dtype=np.int64), np.asarray(cols, dtype=np.int64)


def load_run(run_dir: str | os.PathLike[str], device: str = "cpu") -> LoadedRun:
    """Open ``DIR`` written by :func:`train_perturbation_model`."""
    import anndata as ad

    from celltune.model.checkpoint import load_model

    d = Path(run_dir)
    need = [d / "model" / "args.json", d / "config.yaml", d / "controls.h5ad", d / "run.json"]
    missing = [str(p.relative_to(d)) for p in need if not p.exists()]
    if missing:
        raise InputError(
            f"{d} is not a finished 'celltune perturb train' run (missing {', '.join(missing)}); "
            "train first, or finish it with 'celltune perturb train ... --resume'"
        )
    check_not_in_use(d)  # a run still training is not read half-way
    verify_manifest(d, ["config.yaml", "controls.h5ad", "run.json"])  # model/: load_model
    cfg = load_perturb_config(d / "config.yaml")
    model = load_model(d / "model", device=device)
    if not model.config.generator:
        raise InputError(f"{d / 'model'} is not a perturbation model (no perturbation flags)")
    info = json.loads((d / "run.json").read_text())
    ctrl = ad.read_h5ad(d / "controls.h5ad")
    genes = ctrl.var["gene_name"].astype(str).to_numpy()
    vocab = model.vocab
    gene_ids = np.asarray([vocab[g] for g in genes], dtype=np.int64)
    X = ctrl.X.toarray() if sp.issparse(ctrl.X) else np.asarray(ctrl.X)
    return LoadedRun(
        out_dir=d,
        model=model,
        config=cfg,
        info=info,
        genes=genes,
        gene_ids=gene_ids,
        controls=np.asarray(X, dtype=np.float32),
    )
