"""Time and peak memory of ``celltune preprocess`` vs scanpy's own normalise + log1p + HVG.

Each measurement runs in a fresh subprocess so that ``ru_maxrss`` (the peak resident set)
belongs to that measurement alone. CPU seconds are reported beside wall seconds because
the machine may be shared (wall time then grows with the load, CPU time much less).
Datasets: the real 12,261-cell Kang donors file and a
copy replicated N times (built sparse: CSR row blocks, never densified). Usage::

    PYTHONPATH=. python benchmarks/bench_preprocess.py [--reps 10] [--out bench_out/preprocess.json]
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (
    Path(os.environ.get("CELLTUNE_SHARED", ROOT.parent / "shared"))
    / "data/integration/kang2018_pbmc_ctrl_8donors_muscat_12261cells.h5ad"
)
METHODS = ("celltune", "scanpy")


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(method: str, path: str, n_hvg: int, batch_key: str) -> dict[str, float]:
    """One measurement: load, then run ``method``; prints nothing, returns the numbers."""
    import anndata as ad
    import scanpy as sc

    from celltune.data.preprocess import preprocess

    t0 = time.perf_counter()
    adata = ad.read_h5ad(path)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    if method == "celltune":
        out = preprocess(adata, n_hvg=n_hvg, batch_key=batch_key)
    else:  # scanpy's own pipeline on the same data (what celltune wraps, minus binning)
        adata.layers["counts"] = adata.X.copy()
        sc.pp.filter_genes(adata, min_counts=3)
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(
            adata, n_top_genes=n_hvg, flavor="seurat_v3", layer="counts", batch_key=batch_key
        )
        out = adata[:, adata.var["highly_variable"]].copy()
    run_s = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    return {
        "load_s": load_s,
        "run_s": run_s,
        "cpu_s": cpu_s,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": _peak_mb(),
        "n_hvg_out": int(out.n_vars),
    }


def replicate(src: Path, reps: int, dst: Path) -> None:
    """Stack ``reps`` copies of ``src`` (CSR blocks) with unique cell names."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from celltune.data.io import write_h5ad

    a = ad.read_h5ad(src)
    X = sp.vstack([a.X] * reps, format="csr")
    obs = pd.concat([a.obs] * reps)
    obs.index = [f"{n}-r{k}" for k in range(reps) for n in a.obs_names]
    write_h5ad(ad.AnnData(X=X, obs=obs, var=a.var.copy()), dst)


def describe(path: Path) -> dict[str, float]:
    import anndata as ad

    a = ad.read_h5ad(path, backed="r")
    n, g = a.shape
    nnz = a.X.nnz if hasattr(a.X, "nnz") else int(a.X.to_memory().nnz)
    a.file.close()
    return {
        "n_cells": n,
        "n_genes": g,
        "nnz": nnz,
        "csr_mb": (nnz * 8 + (n + 1) * 8) / 2**20,
        "dense_mb": n * g * 4 / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--reps", type=int, default=10, help="replication factor of the big copy")
    ap.add_argument("--n-hvg", type=int, default=1200)
    ap.add_argument("--batch-key", default="batch")
    ap.add_argument("--out", type=Path, default=Path("bench_out/preprocess.json"))
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = worker(args.worker[0], args.worker[1], args.n_hvg, args.batch_key)
        print(json.dumps(res))
        return

    from celltune.files import write_json_atomic

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pp_") as tmp:
        big = Path(tmp) / f"kang_x{args.reps}.h5ad"
        replicate(args.data, args.reps, big)
        datasets = {"kang 12k": args.data, f"kang x{args.reps}": big}
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
        for name, path in datasets.items():
            info = describe(path)
            for method in METHODS:
                cmd = [sys.executable, __file__, "--worker", method, str(path)]
                cmd += ["--n-hvg", str(args.n_hvg), "--batch-key", args.batch_key]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise SystemExit(f"{method} on {name} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({"dataset": name, "method": method, **info, **res})
                print(f"  done: {name:10s} {method:9s} {res['run_s']:.1f} s", file=sys.stderr)

    hdr = (
        f"{'dataset':11s} {'method':9s} {'cells':>9s} {'nnz':>11s} {'CSR MB':>7s} "
        f"{'dense MB':>9s} {'wall s':>6s} {'CPU s':>6s} {'RSS load MB':>11s} {'peak MB':>8s} "
        f"{'peak-load':>9s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['dataset']:11s} {r['method']:9s} {r['n_cells']:>9,} {r['nnz']:>11,} "
            f"{r['csr_mb']:>7.0f} {r['dense_mb']:>9.0f} {r['run_s']:>6.1f} {r['cpu_s']:>6.1f} "
            f"{r['rss_after_load_mb']:>11.0f} {r['peak_rss_mb']:>8.0f} "
            f"{r['peak_rss_mb'] - r['rss_after_load_mb']:>9.0f}"
        )
    meta = {
        "n_hvg": args.n_hvg,
        "batch_key": args.batch_key,
        "reps": args.reps,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    write_json_atomic(args.out, {"meta": meta, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
