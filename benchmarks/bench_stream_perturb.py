"""Peak memory of ``celltune stats --stream`` and ``celltune perturb train --stream`` on a
1x file and the same cells replicated 10x: does memory grow with cells?

Source: the real Papalexi 2021 ECCITE-seq file (19,763 THP-1 cells x 299 genes, raw UMI
counts). ``stats`` reads it as it is; ``perturb train`` reads it after ``celltune perturb
prepare`` (in memory, once: normalise + log1p, all 299 genes, simulation split, GEARS DE
genes). Each file is replicated with :func:`celltune.data.replicate.replicate_h5ad` (rows
repeated, cell names suffixed ``-<k>``; obs keeps ``condition``/``split``, and ``uns``
keeps the DE genes of the prepared file). Each command runs in its own process
(``python -m celltune ...``); its peak resident memory is ``ru_maxrss`` (``os.wait4``).
The in-memory commands (no ``--stream``) run too, for contrast.

Settings are small: ``stats --methods t-test`` (DE on at most 5,000 cells per group when
streamed); ``perturb train`` with a 1-layer 32-dim model, 1 epoch of 3 steps of 32 cells,
50 validation control cells. Goal (issue 10): peak(10x) / peak(1x) <= 1.2 streamed.

    python benchmarks/bench_stream_perturb.py            # ~5-10 min on 2 cores

Prints a Markdown table and writes ``benchmarks/results/bench_stream_perturb.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_stream_commands import SHARED, measure  # noqa: E402

PAPALEXI = SHARED / "data/perturbation/papalexi2021_thp1_eccite_sceptre_lowmoi.h5ad"
TRAIN = [
    "--epochs", "1", "--batch-size", "32", "--quiet", "--device", "cpu",
    "--set", "model.d_model=32", "--set", "model.d_hid=32", "--set", "model.nlayers=1",
    "--set", "model.nhead=2", "--set", "train.max_steps_per_epoch=3",
    "--set", "data.n_eval_ctrl=50", "--set", "data.control_pool=100",
]  # fmt: skip
STATS = ["--condition-key", "condition", "--control", "ctrl", "--methods", "t-test"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--no-memory", action="store_true", help="skip the in-memory contrast")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/bench_stream_perturb.json"
    )
    args = ap.parse_args()
    import anndata

    from celltune.data.replicate import replicate_h5ad

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="celltune-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepared = work / "prepared.h5ad"
        m = measure(["perturb", "prepare", str(PAPALEXI), "--out", str(prepared), "--n-hvg",
                     "299"])  # fmt: skip
        print("prepare (in memory, once):", m, flush=True)
        factors = sorted({1, args.factor})
        raw = {
            f: replicate_h5ad(PAPALEXI, work / f"raw_x{f}.h5ad", f, compression=None)
            for f in factors
        }
        prep = {
            f: replicate_h5ad(prepared, work / f"prep_x{f}.h5ad", f, uns=True, compression=None)
            for f in factors
        }
        modes = [True] if args.no_memory else [True, False]
        for stream in modes:
            flag = ["--stream"] if stream else []
            for f in factors:
                out = work / f"stats_{stream}_{f}"
                argv = ["stats", str(raw[f]), *STATS, "--out", str(out), *flag]
                rows.append({"command": "stats" + (" --stream" if stream else ""), "factor": f,
                             "file": raw[f], **measure(argv)})  # fmt: skip
                print(rows[-1], flush=True)
            for f in factors:
                out = work / f"train_{stream}_{f}"
                argv = ["perturb", "train", str(prep[f]), "--out", str(out), *TRAIN, *flag]
                rows.append({"command": "perturb train" + (" --stream" if stream else ""),
                             "factor": f, "file": prep[f], **measure(argv)})  # fmt: skip
                print(rows[-1], flush=True)
        for r in rows:
            ad = anndata.read_h5ad(r["file"], backed="r")
            r["cells"] = int(ad.n_obs)
            ad.file.close()
            r["file_mib"] = round(r["file"].stat().st_size / 2**20, 1)
            r["file"] = r["file"].name
    ratios = {}
    for cmd in dict.fromkeys(r["command"] for r in rows):
        by = {r["factor"]: r for r in rows if r["command"] == cmd}
        ratios[cmd] = round(by[args.factor]["peak_rss_mib"] / by[1]["peak_rss_mib"], 3)
    print()
    print("| command | factor | cells | file MiB | peak RSS MiB | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| `celltune {r['command']}` | {r['factor']}x | {r['cells']:,} | {r['file_mib']} "
            f"| {r['peak_rss_mib']} | {r['wall_s']} |"
        )
    print()
    for cmd, ratio in ratios.items():
        verdict = "OK" if ratio <= 1.2 else "ABOVE TARGET"
        target = " (target <= 1.2: " + verdict + ")" if "--stream" in cmd else " (in memory)"
        print(f"peak({args.factor}x) / peak(1x), {cmd}: {ratio}{target}")
    result = {
        "benchmark": "bench_stream_perturb",
        "source": str(PAPALEXI),
        "factor": args.factor,
        "settings": {"stats": STATS, "perturb train": TRAIN},
        "rows": rows,
        "ratio_peak_rss": ratios,
        "target_ratio": 1.2,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
