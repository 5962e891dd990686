"""Time and peak memory of ``celltune stats`` on a size-scaled replicate of real data.

The Papalexi ECCITE-seq counts (19,763 cells × 299 genes) are replicated: cells are drawn
with replacement up to ``--cells`` (conditions kept) and the gene columns are tiled up to
``--genes`` (each copy renamed, with the counts of a different random cell order so copies
are not identical). Prints a table and writes JSON (default benchmarks/results/bench_stats.json).
Wall time depends on other load on the machine; ``stats_cpu_s`` (process CPU time) does not.

    PYTHONPATH=. python benchmarks/bench_stats.py --cells 100000 --genes 5000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celltune.analysis.perturbation_stats import compute_perturbation_stats  # noqa: E402
from celltune.files import write_json_atomic  # noqa: E402
from celltune.report.stats_report import write_stats  # noqa: E402

PAPALEXI = (
    ROOT.parent
    / "shared"
    / "data"
    / "perturbation"
    / ("papalexi2021_thp1_eccite_sceptre_lowmoi.h5ad")
)


def replicate(src: ad.AnnData, n_cells: int, n_genes: int, seed: int = 0) -> ad.AnnData:
    """Cells resampled within conditions, genes tiled; CSR float32 like the source."""
    rng = np.random.default_rng(seed)
    cond = src.obs["condition"].astype(str).to_numpy()
    rows = rng.choice(src.n_obs, n_cells, replace=True)
    X = src.X.tocsr()
    blocks, names = [], []
    copies = int(np.ceil(n_genes / src.n_vars))
    for k in range(copies):
        # shuffle rows within each condition so tiled copies differ but keep the effects
        perm = np.arange(src.n_obs)
        for c in np.unique(cond):
            idx = np.flatnonzero(cond == c)
            perm[idx] = rng.permutation(idx)
        blocks.append(X[perm[rows]])
        names.extend(f"{g}_{k}" if k else g for g in src.var_names)
    big = sp.hstack(blocks, format="csr")[:, :n_genes]
    obs = pd.DataFrame({"condition": cond[rows]}, index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=names[:n_genes])
    return ad.AnnData(X=big.astype(np.float32), obs=obs, var=var)


def _child(path: str, methods: str, out_dir: str) -> None:
    """Run in a fresh process so its peak RSS is that of reading + stats only."""
    t0 = time.perf_counter()
    data = ad.read_h5ad(path)
    t_read = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    res = compute_perturbation_stats(data, methods=methods.split(","))
    t_stats, c_stats = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    write_stats(res, out_dir)
    t_write = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "read_s": round(t_read, 1),
                "stats_s": round(t_stats, 1),
                "stats_cpu_s": round(c_stats, 1),
                "write_s": round(t_write, 1),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=5_000)
    p.add_argument("--methods", default="wilcoxon,t-test")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_stats.json")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(*a.child)
        return

    src = ad.read_h5ad(PAPALEXI)
    t0 = time.perf_counter()
    data = replicate(src, a.cells, a.genes)
    t_build = time.perf_counter() - t0
    nnz = int(data.X.nnz)
    x_mb = (data.X.data.nbytes + data.X.indices.nbytes + data.X.indptr.nbytes) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        h5 = Path(tmp) / "replicate.h5ad"
        data.write_h5ad(h5)
        del data, src
        cmd = [sys.executable, __file__, "--child", str(h5), a.methods, str(Path(tmp) / "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    row = {
        "cells": a.cells,
        "genes": a.genes,
        "nnz": nnz,
        "density": round(nnz / (a.cells * a.genes), 4),
        "X_csr_MiB": round(x_mb, 1),
        "methods": a.methods,
        "build_s": round(t_build, 1),
        **child,
        "peak_rss_MiB_read_plus_stats": round(peak, 1),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "cpu_count": os.cpu_count(),
    }
    width = max(len(k) for k in row)
    for k, v in row.items():
        print(f"{k:<{width}}  {v}")
    write_json_atomic(a.out, row)


if __name__ == "__main__":
    main()
