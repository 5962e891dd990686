"""Training throughput with 1 and 2 processes (DDP on gloo) for the same global batch.

Configurations, all on the same global mini-batch of real Kang PBMC cells (one donor, as
the batch-aware sampler draws it; tokenised by celltune, 1,201 tokens) and the
integration model of SPEC §4:

- ``1 proc × 1 thread``  — the per-core baseline;
- ``1 proc × 2 threads`` — intra-op parallelism (what a plain ``celltune integrate`` uses);
- ``2 procs × 1 thread`` — ``DistributedDataParallel`` on gloo, each rank takes half of
  the global batch (what ``torchrun --nproc-per-node 2 -m celltune integrate`` does);
  ranks are spawned with :func:`celltune.train.distributed.run_in_processes`, which sets
  the same environment variables as torchrun.

A step is forward + backward (+ gradient all-reduce under DDP) + clipping + Adam. The
first step is a warm-up; the table reports the median of the timed steps, the
throughput (global cells/s) and the speed-up over 1 × 1.

    python benchmarks/bench_scaling.py                  # ~3-5 min on 2 cores
    python benchmarks/bench_scaling.py --global-batch 8 --steps 2   # quicker

Writes ``bench_out/scaling.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import build_model, integration_step  # noqa: E402
from bench_roofline import real_batch  # noqa: E402


def run_steps(batch: dict[str, Any], n_genes: int, n_batches: int, steps: int) -> dict[str, Any]:
    """Time ``steps + 1`` training steps on this rank's share of ``batch`` (module level so
    spawned ranks can import it)."""
    import torch

    from celltune.losses import IntegrationObjective
    from celltune.train import distributed as dist_utils

    world, rank = dist_utils.world_size(), dist_utils.rank()
    share = {k: v[rank::world].contiguous() for k, v in batch.items()}
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_model(n_genes, n_batches)
    net: Any = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, find_unused_parameters=True)
    objective = IntegrationObjective()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    net.train()
    times, losses = [], []
    for _ in range(steps + 1):
        dist_utils.barrier()
        t0 = time.perf_counter()
        loss = integration_step(net, objective, share)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dist_utils.barrier()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return {"rank": rank, "times": times[1:], "losses": losses, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "scaling.json"))
    args = p.parse_args()

    import torch

    from celltune.files import write_json_atomic
    from celltune.train.distributed import run_in_processes

    t_all = time.perf_counter()
    batch, n_genes, n_batches = real_batch(args.global_batch)
    G, L = batch["gene_ids"].shape
    fn_args = (batch, n_genes, n_batches, args.steps)
    rows = []
    for label, procs, threads in (
        ("1 proc × 1 thread", 1, 1),
        ("1 proc × 2 threads", 1, 2),
        ("2 procs × 1 thread (DDP, gloo)", 2, 1),
    ):
        if procs == 1:
            torch.set_num_threads(threads)
            results = [run_steps(*fn_args)]
        else:
            results = run_in_processes(
                run_steps, procs, args=fn_args, threads_per_process=threads, timeout=900
            )
        # a DDP step ends when the slowest rank ends: take the max over ranks per step
        per_step = [max(r["times"][i] for r in results) for i in range(args.steps)]
        step = statistics.median(per_step)
        rows.append(
            {
                "config": label,
                "processes": procs,
                "threads_per_process": threads,
                "step_s": step,
                "step_times": per_step,
                "cells_per_s": G / step,
                "losses_rank0": results[0]["losses"],
            }
        )
        print(f"  {label}: {step:.2f} s/step", flush=True)
    base = rows[0]["cells_per_s"]
    for r in rows:
        r["speedup_vs_1x1"] = r["cells_per_s"] / base
    write_json_atomic(
        args.out,
        {
            "global_batch": int(G),
            "tokens": int(L),
            "steps": args.steps,
            "rows": rows,
            "wall_s": time.perf_counter() - t_all,
        },
    )
    print(f"global batch {G} cells × {L} tokens (integration config), median of {args.steps}")
    print("| configuration | s/step | cells/s | speed-up vs 1×1 |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['step_s']:.2f} | {r['cells_per_s']:.2f} "
            f"| {r['speedup_vs_1x1']:.2f}× |"
        )
    print(f"wrote {args.out} ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
