"""Peak memory of the real commands ``celltune integrate --stream`` and ``celltune embed
--stream`` on a 1x file and the same cells replicated 10x: does memory grow with cells?

The real Kang 2018 ctrl/stim PBMC file (1,556 cells; ``--source donors`` for the 12,261-cell
file) is copied 1x and replicated ``--factor`` times into CSR ``.h5ad`` files with
:func:`celltune.data.replicate.replicate_h5ad` (rows repeated, cell names suffixed
``-<k>`` so they stay unique). Each command runs in its own process (``python -m
celltune ...``); its peak resident memory is that process's ``ru_maxrss`` (``os.wait4``).
Settings are small (a 2-layer 32-dim model, 1 epoch, 100 HVGs, bounded HVG and evaluation
samples) so the whole benchmark takes a few minutes on 2 cores; what is measured is the
data path, whose memory must not follow the number of cells. ``embed`` uses the model
the 1x ``integrate`` run wrote.

Goal (issue 10): peak(10x) / peak(1x) <= 1.2 for both commands.

    python benchmarks/bench_stream_commands.py            # ~3-6 min on 2 cores
    python benchmarks/bench_stream_commands.py --source donors --factor 5

Prints a Markdown table and writes ``benchmarks/results/bench_stream_commands.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("CELLTUNE_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data/integration"
SOURCES = {
    "stim": (DATA / "kang2018_pbmc_ifnb_ctrl_stim_muscat_1556cells.h5ad", "batch"),
    "donors": (DATA / "kang2018_pbmc_ctrl_8donors_muscat_12261cells.h5ad", "batch"),
}
SMALL = [
    "--epochs", "1", "--batch-size", "64", "--n-hvg", "100", "--max-seq-len", "101",
    "--chunk-size", "256", "--buffer-chunks", "2", "--stream-sample-cells", "1000",
    "--eval-cells", "1000", "--baselines", "none", "--quiet", "--device", "cpu",
    "--set", "model.d_model=32", "--set", "model.d_hid=32", "--set", "model.nlayers=2",
]  # fmt: skip


def measure(argv: list[str]) -> dict[str, Any]:
    """Peak RSS of one command; Popen.wait would reap the child first, so wait4 ourselves."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celltune", *argv], env=env, stdout=log, stderr=log
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(
                f"celltune {argv[0]} failed ({proc.returncode}):\n{log.read()[-3000:]}"
            )
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1)}


def make_files(src: Path, factor: int, work: Path) -> dict[int, Path]:
    from celltune.data.replicate import replicate_h5ad

    files = {}
    for f in sorted({1, factor}):
        files[f] = replicate_h5ad(src, work / f"x{f}.h5ad", f, compression=None)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=sorted(SOURCES), default="stim")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/bench_stream_commands.json"
    )
    args = ap.parse_args()
    src, batch_key = SOURCES[args.source]
    with tempfile.TemporaryDirectory(prefix="celltune-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = make_files(src, args.factor, work)
        rows: list[dict[str, Any]] = []
        for f, path in files.items():
            out = work / f"run_x{f}"
            argv = [
                "integrate",
                str(path),
                "--batch-key",
                batch_key,
                "--out",
                str(out),
                "--stream",
                *SMALL,
            ]
            rows.append({"command": "integrate --stream", "factor": f, **measure(argv)})
            print(rows[-1], flush=True)
        model = work / "run_x1" / "model"
        for f, path in files.items():
            argv = [
                "embed", str(path), "--model", str(model), "--out", str(work / f"emb_x{f}.h5ad"),
                "--batch-key", batch_key, "--stream", "--chunk-size", "256", "--quiet",
                "--device", "cpu",
            ]  # fmt: skip
            rows.append({"command": "embed --stream", "factor": f, **measure(argv)})
            print(rows[-1], flush=True)
        import anndata

        for r in rows:
            ad = anndata.read_h5ad(files[r["factor"]], backed="r")
            r["cells"] = int(ad.n_obs)
            ad.file.close()
            r["file_mib"] = round(files[r["factor"]].stat().st_size / 2**20, 1)
    ratios = {}
    for cmd in ("integrate --stream", "embed --stream"):
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
        print(f"peak({args.factor}x) / peak(1x), {cmd}: {ratio} (target <= 1.2: {verdict})")
    result = {
        "benchmark": "bench_stream_commands",
        "source": str(src),
        "factor": args.factor,
        "settings": SMALL,
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
