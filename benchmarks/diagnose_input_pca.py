"""How much biology is in what the model reads? scIB metrics of a 50-component PCA of
three views of the same cells and HVGs: log-normalised values (the usual baseline), the
binary expressed-or-not matrix, and celltune's per-cell value bins (SPEC §1, the model's
input). If the bins' PCA scores like the log-normalised one, binning is not what a
from-scratch model loses (issue 16, round 4 in docs/integration-recipe.md).

    python benchmarks/diagnose_input_pca.py \\
        ../shared/data/integration/kang2018_pbmc_ifnb_harmony_pbmc_stim_2000cells.h5ad
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from celltune.data.binning import bin_matrix, cell_keys
from celltune.eval.integration import scib_metrics_table
from celltune.files import write_json_atomic

COLUMNS = [
    "nmi", "ari", "asw_celltype", "isolated_label", "clisi", "asw_batch", "ilisi", "kbet",
    "graph_connectivity", "scib_bio", "scib_batch", "scib_total",
]  # fmt: skip


def pca(m: np.ndarray | sp.spmatrix, k: int = 50) -> np.ndarray:
    """Top-``k`` principal-component scores of the centred matrix (exact SVD)."""
    x = np.asarray(m.todense() if sp.issparse(m) else m, dtype=np.float64)
    x -= x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return (u[:, :k] * s[:k]).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", type=Path)
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--n-hvg", type=int, default=1200)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    a = ad.read_h5ad(args.data)
    sc.pp.filter_genes(a, min_counts=3)
    counts = sp.csr_matrix(a.X, dtype=np.float32)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=args.n_hvg)
    hv = a.var["highly_variable"].to_numpy()
    raw = counts[:, hv]
    a.obsm["lognorm"] = pca(a.X[:, hv])
    a.obsm["binary"] = pca((raw > 0).astype(np.float32))
    a.obsm["bins"] = pca(bin_matrix(raw, 51, 0, cell_keys(a.obs_names), quiet=True))
    views = {k: k for k in ("lognorm", "binary", "bins")}
    table = scib_metrics_table(a, views, args.batch_key, args.label_key, quiet=True)[COLUMNS]
    print(f"{args.data.name}: {a.n_obs} cells, {int(hv.sum())} HVGs, PCA 50 of each view")
    print(table.round(3).to_string())
    if args.json:
        write_json_atomic(args.json, {"data": str(args.data), "table": json.loads(table.to_json())})


if __name__ == "__main__":
    main()
