"""Is the cell embedding or the GEPC decoder the bottleneck? (issue 16)

For one finished ``celltune integrate`` run: the mean squared error of the binned
expression (every HVG, zeros included, each batch's gene means removed) that

- the per-batch gene means leave (what a decoder that ignores the cell embedding gets),
- rank-k PCA reconstructions reach (k = 1, 2, 5, 10, 50; in-sample),
- a ridge regression from the run's embedding reaches on held-out cells (25%), and the
  same readout from the unintegrated PCA (``obsm['X_pca']``).

Compare with ``val/gepc`` in the run's ``history.csv`` (the model's own decoder). Run:
``python benchmarks/diagnose_decoder.py RUN_DIR DATA.h5ad --batch-key batch``.
Prints a table and writes ``RUN_DIR/diagnose_decoder.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import yaml
from sklearn.linear_model import Ridge

from celltune.data.preprocess import preprocess


def _binned(data: Path, run: Path, batch_key: str) -> tuple[np.ndarray, pd.Index]:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    pp = preprocess(
        anndata.read_h5ad(data),
        n_hvg=cfg["data"]["n_hvg"],
        batch_key=batch_key,
        data_is_raw=cfg["data"]["data_is_raw"],
        n_bins=cfg["data"]["n_bins"],
        seed=cfg["train"]["seed"],
    )
    hv = pp.var["highly_variable"].to_numpy(bool) if "highly_variable" in pp.var else None
    x = pp.layers["X_binned"]
    x = (x[:, hv] if hv is not None else x).toarray().astype(np.float64)
    b = pp.obs[batch_key].astype(str).to_numpy()
    for v in np.unique(b):
        x[b == v] -= x[b == v].mean(0)
    return x, pp.obs_names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--batch-key", default="batch")
    args = ap.parse_args()
    x, names = _binned(args.data, args.run, args.batch_key)
    rows = {"per-batch gene means": float((x**2).mean())}
    s = np.linalg.svd(x, compute_uv=False)
    for k in (1, 2, 5, 10, 50):
        rows[f"PCA rank {k} (in-sample)"] = float(((x**2).sum() - (s[:k] ** 2).sum()) / x.size)
    integ = anndata.read_h5ad(args.run / "integrated.h5ad")
    pos = integ.obs_names.get_indexer(names)
    held = np.random.default_rng(0).random(len(x)) < 0.25
    for key, label in (("X_celltune", "ridge from celltune"), ("X_pca", "ridge from PCA")):
        e = np.asarray(integ.obsm[key])[pos]
        e = (e - e.mean(0)) / (e.std(0) + 1e-8)
        pred = Ridge(alpha=1.0).fit(e[~held], x[~held]).predict(e[held])
        rows[f"{label} {e.shape[1]}-d (held out)"] = float(((x[held] - pred) ** 2).mean())
    hist = pd.read_csv(args.run / "history.csv")
    if "val/gepc" in hist:
        rows["model's own decoder (val/gepc, last epoch)"] = float(hist["val/gepc"].iloc[-1])
    for k, v in rows.items():
        print(f"{k:45s} {v:8.2f}")
    (args.run / "diagnose_decoder.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
