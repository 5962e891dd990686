"""Held-out-donor annotation benchmark on the Kang 8-donor PBMC file.

Leave one donor out at a time: fit every method on the other 7 donors, predict the held-out
donor, score macro-F1 / accuracy over the classes the reference has. celltune's settings are
fixed in advance (no tuning on the held-out donor; its model is selected by macro-F1 on a
10% validation split of the reference). Prints the table and writes JSON + confusion plots.

    python benchmarks/bench_annotation.py --donors 101,1039,107 \
        --json benchmarks/results/annotation_kang8.json --images docs/images
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from celltune.eval.annotation import BASELINES, run_baselines, score_annotation
from celltune.files import write_json_atomic
from celltune.report.annotation_plots import plot_confusion
from celltune.tasks.annotation import predict_labels, train_annotation

DATA = Path(__file__).resolve().parents[1] / "../shared/data/integration"
KANG8 = DATA / "kang2018_pbmc_ctrl_8donors_muscat_12261cells.h5ad"


def celltune_config(args: argparse.Namespace) -> dict:
    """A small model trained for 8 whole epochs (~1,300 steps), chosen on the reference's
    validation split of fold 101 (macro-F1 0.80 vs 0.60 for the earlier 6 x 50 steps at
    dropout 0.2; docs/benchmarks.md), never on a held-out donor."""
    return {
        "label_key": "cell_type",
        "d_model": 64,
        "nhead": 4,
        "d_hid": 64,
        "nlayers": 2,
        "nlayers_cls": 3,
        "max_seq_len": args.max_seq_len,
        "balanced": args.balanced,
        "dropout": args.dropout,
        "train": {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": 64,
            "max_steps_per_epoch": args.steps,
            "scheduler": "cosine",
            "warmup_steps": 50,
            "patience": None,
            "quiet": True,
            "device": "cpu",
            "seed": args.seed,
        },
    }


def run_fold(adata: ad.AnnData, donor: str, args: argparse.Namespace) -> dict:
    ref = adata[adata.obs["donor"] != donor].copy()
    query = adata[adata.obs["donor"] == donor].copy()
    classes = sorted(ref.obs["cell_type"].astype(str).unique())
    preds: dict[str, tuple[np.ndarray, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train_annotation(ref, celltune_config(args), tmp)
        out = predict_labels(query, res.model_dir, device="cpu")
        preds["celltune"] = (
            out.obs["celltune_label"].astype(str).to_numpy(),
            time.perf_counter() - t0,
        )
        best_epoch = res.best_epoch
    preds.update(run_baselines(ref, query, "cell_type", batch_key="donor", seed=args.seed))
    rows, scores = [], {}
    for method, (pred, secs) in preds.items():
        s = score_annotation(query.obs["cell_type"], pred, classes)
        scores[method] = s
        rows.append(
            {
                "donor": donor,
                "method": method,
                "macro_f1": s.macro_f1,
                "accuracy": s.accuracy,
                "seconds": secs,
                "n_query": s.n_scored,
            }
        )
    return {"rows": rows, "scores": scores, "celltune_best_epoch": best_epoch}


def summarise(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    g = df.groupby("method")
    table = pd.DataFrame(
        {
            "macro_f1_mean": g["macro_f1"].mean(),
            "macro_f1_sd": g["macro_f1"].std(ddof=1),
            "accuracy_mean": g["accuracy"].mean(),
            "accuracy_sd": g["accuracy"].std(ddof=1),
            "seconds_mean": g["seconds"].mean(),
            "folds": g.size(),
        }
    )
    return table.sort_values("macro_f1_mean", ascending=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--donors", default="101,1039", help="held-out donors, one fold each")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="max optimizer steps per epoch")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--balanced", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/annotation_kang8.json")
    p.add_argument("--images", default="docs/images")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    adata = ad.read_h5ad(KANG8)
    adata.obs["donor"] = adata.obs["donor"].astype(str)
    rows: list[dict] = []
    meta = {"file": KANG8.name, "args": vars(args), "celltune_config": celltune_config(args)}
    for i, donor in enumerate(args.donors.split(",")):
        fold = run_fold(adata, donor, args)
        rows += fold["rows"]
        for r in fold["rows"]:
            print(
                f"fold {donor:>5} {r['method']:<12} macro-F1 {r['macro_f1']:.3f} "
                f"acc {r['accuracy']:.3f} {r['seconds']:7.1f} s",
                flush=True,
            )
        if i == 0:
            best_base = max(
                (r for r in fold["rows"] if r["method"] in BASELINES), key=lambda r: r["macro_f1"]
            )["method"]
            for m in ("celltune", best_base):
                plot_confusion(
                    fold["scores"][m].confusion,
                    Path(args.images) / f"annotation_confusion_{m}_donor{donor}.png",
                    f"{m}, held-out donor {donor}: macro-F1 {fold['scores'][m].macro_f1:.3f}",
                )
        table = summarise(rows)
        write_json_atomic(
            args.json,
            {
                **meta,
                "folds_done": i + 1,
                "rows": rows,
                "summary": table.reset_index().to_dict("records"),
            },
        )
    print(summarise(rows).to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
