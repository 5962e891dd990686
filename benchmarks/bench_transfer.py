"""Does pretraining help at this scale? Pretrain on the shipped files except one, then
fine-tune ``integrate --pretrained`` on the held-out file against from-scratch training
with the same fine-tuning budget (issue 11, item 2).

For each held-out file H:

1. the pretraining files are the other shipped raw-count human files (the Kang files and
   Papalexi) **minus every cell whose barcode H also holds**: the three Kang files are
   cuts of one study, so without this the "held-out" ctrl cells would be in the
   pretraining data (all 750 ctrl cells of the 1,556-cell file are in the 12k file);
2. ``celltune pretrain`` with the from-scratch recipe's architecture (d_model 64, d_hid 64,
   2 layers, avg-pool, non-zero tokens ≤ 601, dropout 0; lr 1e-3, cosine, 50 warm-up
   steps) for ``--pretrain-steps`` optimizer steps;
3. per seed, ``celltune integrate H --pretrained PT --set model.recipe=scratch`` (the
   scratch recipe's budget and schedule, the pretrained weights and vocabulary) and the
   default ``celltune integrate H`` (from scratch), both with PCA and Harmony baselines.

Every scIB metric of every method is printed (one table per held-out file, mean ± sd over
seeds) and written to JSON with the per-seed values.

    python benchmarks/bench_transfer.py --heldout kang1556,kang2000 --seeds 0,1,2 \\
        --json benchmarks/results/transfer.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLTUNE_SHARED", ROOT / ".." / "shared")) / "data"
FILES = {
    "kang1556": SHARED / "integration/kang2018_pbmc_ifnb_ctrl_stim_muscat_1556cells.h5ad",
    "kang2000": SHARED / "integration/kang2018_pbmc_ifnb_harmony_pbmc_stim_2000cells.h5ad",
    "kang12k": SHARED / "integration/kang2018_pbmc_ctrl_8donors_muscat_12261cells.h5ad",
    "papalexi": SHARED / "perturbation/papalexi2021_thp1_eccite_sceptre_lowmoi.h5ad",
}
#: the from-scratch recipe's architecture and schedule (celltune.tasks.integration.recipe)
PRETRAIN_YAML = """\
model: {d_model: 64, d_hid: 64, nlayers: 2, cell_emb_style: avg-pool, dropout: 0.0}
tokens: {include_zero_gene: false, max_seq_len: 601}
train: {lr: 0.001, scheduler: cosine, warmup_steps: 50, patience: null}
"""
METRICS = (
    "nmi", "ari", "asw_celltype", "isolated_label", "clisi", "asw_batch", "ilisi", "kbet",
    "graph_connectivity", "scib_bio", "scib_batch", "scib_total",
)  # fmt: skip


def barcode(name: str) -> str:
    """The 10x barcode of a cell name (``ACGT...-1``, ``ACGT...-1_ctrl`` -> ``ACGT...``)."""
    return str(name).split("_")[0].split("-")[0]


def pretraining_files(heldout: str, work: Path) -> tuple[list[Path], dict[str, int]]:
    """The other files with the held-out file's barcodes removed; cells dropped per file."""
    held = {barcode(n) for n in ad.read_h5ad(FILES[heldout], backed="r").obs_names}
    out, dropped = [], {}
    for name, path in FILES.items():
        if name == heldout:
            continue
        a = ad.read_h5ad(path)
        keep = np.array([barcode(n) not in held for n in a.obs_names])
        dropped[name] = int((~keep).sum())
        dst = work / f"pretrain_{name}.h5ad"
        ad.AnnData(
            X=a.X[keep], obs=a.obs.iloc[:0].reindex(a.obs_names[keep]), var=a.var[[]]
        ).write_h5ad(dst, compression="gzip")
        out.append(dst)
    return out, dropped


def run(cmd: list[str], log: Path) -> float:
    """Run a celltune command (its output to ``log``); wall seconds. Raises on failure."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def integrate(data: Path, out: Path, seed: int, extra: list[str]) -> dict[str, Any]:
    """One ``celltune integrate`` run; a finished run in ``out`` (``--work``) is reused,
    so a stopped benchmark continues where it was."""
    done = out / "metrics.json"
    if done.is_file() and (out / "wall_s.txt").is_file():
        return {
            "wall_s": float((out / "wall_s.txt").read_text()),
            "metrics": json.loads(done.read_text()),
        }
    cmd = [
        sys.executable, "-m", "celltune", "integrate", str(data), "--batch-key",
        "batch", "--label-key", "cell_type", "--out", str(out), "--baselines", "pca,harmony",
        "--seed", str(seed), "--quiet", "--set", "eval.umap=false", *extra,
    ]  # fmt: skip
    wall = run(cmd, out.with_suffix(".log"))
    (out / "wall_s.txt").write_text(f"{wall:.1f}")
    metrics = json.loads(done.read_text())
    return {"wall_s": wall, "metrics": metrics}


def summarise(runs: list[dict[str, Any]], method: str, key: str) -> dict[str, float]:
    vals = [r[key]["metrics"][method] for r in runs]
    return {
        m: float(np.mean([v[m] for v in vals])) for m in METRICS
    } | {f"{m}_sd": float(np.std([v[m] for v in vals], ddof=1)) if len(vals) > 1 else 0.0
         for m in METRICS}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--heldout", default="kang1556,kang2000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--work", default=None, help="keep the runs here (default: a temp dir)")
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/transfer.json"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="celltune-transfer-")
    work = Path(args.work or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    (work / "pretrain.yaml").write_text(PRETRAIN_YAML)
    result: dict[str, Any] = {"args": vars(args), "heldout": {}}
    for held in args.heldout.split(","):
        hw = work / held
        hw.mkdir(exist_ok=True)
        files, dropped = pretraining_files(held, hw)
        pt = hw / "pretrain"
        pt_done = pt / "model" / "best_model.pt"
        cmd = [
            sys.executable, "-m", "celltune", "pretrain", *map(str, files), "--out",
            str(pt), "--config", str(work / "pretrain.yaml"), "--max-steps",
            str(args.pretrain_steps), "--epochs", "100", "--quiet",
        ]  # fmt: skip
        if pt_done.is_file() and (pt / "wall_s.txt").is_file():
            pt_wall = float((pt / "wall_s.txt").read_text())
        else:
            pt_wall = run(cmd, hw / "pretrain.log")
            (pt / "wall_s.txt").write_text(f"{pt_wall:.1f}")
        runs = []
        for seed in seeds:
            pre = integrate(
                FILES[held], hw / f"pretrained_s{seed}", seed,
                ["--pretrained", str(pt / "model"), "--set", "model.recipe=scratch"],
            )  # fmt: skip
            scratch = integrate(FILES[held], hw / f"scratch_s{seed}", seed, [])
            runs.append({"seed": seed, "pretrained": pre, "scratch": scratch})
            pt_total = pre["metrics"]["celltune"]["scib_total"]
            sc_total = scratch["metrics"]["celltune"]["scib_total"]
            print(
                f"{held} seed {seed}: pretrained {pt_total:.3f} scratch {sc_total:.3f}", flush=True
            )
        table = {
            "celltune pretrained": summarise(runs, "celltune", "pretrained"),
            "celltune scratch": summarise(runs, "celltune", "scratch"),
            "pca": summarise(runs, "pca", "scratch"),
            "harmony": summarise(runs, "harmony", "scratch"),
        }
        diffs = [
            r["pretrained"]["metrics"]["celltune"]["scib_total"]
            - r["scratch"]["metrics"]["celltune"]["scib_total"]
            for r in runs
        ]
        result["heldout"][held] = {
            "pretraining_files": [f.name for f in files],
            "cells_dropped_for_shared_barcodes": dropped,
            "pretrain_wall_s": pt_wall,
            "runs": runs,
            "table": table,
            "pretrained_minus_scratch_total": diffs,
        }
        names = ", ".join(f.name for f in files)
        print(f"\n### held out: {held} ({len(seeds)} seeds; pretraining {pt_wall:.0f} s on "
              f"{names}; shared-barcode cells dropped: {dropped})")  # fmt: skip
        print("| method | " + " | ".join(METRICS) + " |")
        print("|---|" + "---|" * len(METRICS))
        for name, row in table.items():
            cells = [f"{row[m]:.3f}±{row[m + '_sd']:.3f}" for m in METRICS]
            print(f"| {name} | " + " | ".join(cells) + " |")
        wins = sum(d > 0 for d in diffs)
        print(f"pretrained − scratch scib_total: mean {np.mean(diffs):+.3f} "
              f"(wins {wins}/{len(diffs)})")  # fmt: skip
    from celltune.files import write_json_atomic

    write_json_atomic(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
