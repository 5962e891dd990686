"""The GPU code paths in one run of under 5 minutes: a whole-human-shaped model on CUDA.

Why: every other benchmark runs on CPU, and CUDA-only paths (fused SDPA kernels, bf16 /
fp16 autocast with GradScaler, NCCL) are otherwise never exercised. On a CUDA machine
this script:

1. builds the whole-human-shaped model (``scripts/make_whole_human_model.py``: d_model
   512, 12 layers, 8 heads, 48,295 tokens, random weights);
2. reports which SDPA kernel ran (flash / efficient / cudnn / math; read from the
   profiler's op names) in fp32 and bf16, with and without a padding mask;
3. trains the same steps from the same weights in fp32, bf16 autocast and fp16 autocast
   + GradScaler at batch 64 x 1,201 tokens: first-step losses must agree (rtol 5e-2), no
   loss may be NaN/inf and fp16 must take at least one step that GradScaler does not
   skip; cells/s, inference cells/s and peak CUDA memory per precision;
4. runs ``celltune integrate`` and ``celltune perturb train`` for a few steps with
   ``--device cuda`` on the shipped data (``CELLTUNE_SHARED`` or ``../shared``);
5. runs ``celltune integrate`` under torchrun with one process (what ``--devices 1``
   would launch; with one process celltune needs no process group), and a one-process
   NCCL process group training the whole-human model under DDP (``--nccl-worker``): the
   NCCL path that ``--devices N`` takes on N GPUs.

It prints a table and writes JSON (``--out``). Without a CUDA GPU it says so and exits 0.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NO_GPU = "no CUDA GPU is present: gpu_check has nothing to check on this machine"
BATCH, SEQ = 64, 1201
LOSS_RTOL = 5e-2
#: where the model checks run (a module setting so their logic can be dry-run on CPU)
DEVICE = "cuda"
SDPA_OPS = {
    "flash": "_scaled_dot_product_flash_attention",
    "efficient": "_scaled_dot_product_efficient_attention",
    "cudnn": "_scaled_dot_product_cudnn_attention",
}


def shared_data() -> Path | None:
    """The shipped datasets (``CELLTUNE_SHARED``/data, else ../shared/data or ./shared/data)."""
    env = os.environ.get("CELLTUNE_SHARED")
    for root in [Path(env)] if env else [ROOT.parent / "shared", ROOT / "shared"]:
        if (root / "data").is_dir():
            return root / "data"
    return None


def build_model_dir(out: Path, nlayers: int, wheel: Path | None) -> dict[str, Any]:
    """The whole-human-shaped directory, written by the repository's script (offline)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "make_whole_human_model.py"), str(out)]
    cmd += ["--nlayers", str(nlayers)]
    cmd += ["--scgpt-wheel", str(wheel)] if wheel else ["--offline"]
    subprocess.run(cmd, check=True, capture_output=True, env=_env())
    return json.loads((out / "celltune_note.json").read_text())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def make_batch(ntoken: int, pad_id: int, cls_id: int, device: Any, seed: int = 0) -> dict:
    """64 cells x 1,201 tokens: <cls> + random genes, binned values, 40% masked, and the
    last 10% of every second cell padded (so the padding-mask path runs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    genes = torch.randint(0, ntoken - 3, (BATCH, SEQ), generator=g)
    genes[:, 0] = cls_id
    target = torch.randint(0, 51, (BATCH, SEQ), generator=g).float()
    target[:, 0] = 0.0
    pad = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    pad[::2, int(SEQ * 0.9) :] = True
    genes[pad] = pad_id
    target[pad] = -2.0
    masked = (torch.rand(BATCH, SEQ, generator=g) < 0.4) & ~pad
    masked[:, 0] = False
    values = target.masked_fill(masked, -1.0)
    batch = {"gene_ids": genes, "values": values, "target_values": target, "padding_mask": pad}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["mask"] = masked.to(device)
    return batch


def _forward(model: Any, batch: dict, padding: bool = True) -> dict:
    pad = batch["padding_mask"] if padding else None
    return model(batch["gene_ids"], batch["values"], padding_mask=pad, MVC=True)


def sdpa_backends(model: Any, batch: dict) -> dict[str, str]:
    """Which fused kernel PyTorch dispatched to, per dtype and with / without padding."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    out = {}
    model.eval()
    for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for padding in (False, True):
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
                with torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
                    _forward(model, batch, padding)
                torch.cuda.synchronize()
            names = {e.name for e in prof.events()}
            used = [k for k, op in SDPA_OPS.items() if any(op in n for n in names)]
            key = f"{dtype_name}, {'padding mask' if padding else 'no mask'}"
            out[key] = ",".join(used) or "math"
    model.train()
    return out


def train_precision(base: Any, batch: dict, precision: str, steps: int) -> dict[str, Any]:
    """``steps`` optimizer steps from ``base``'s weights; losses, cells/s, peak memory."""
    import torch

    from celltune.losses import IntegrationObjective, ObjectiveWeights

    model = copy.deepcopy(base).train()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    eps = 1e-4 if precision == "fp16" else 1e-8
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=eps, fused=True)
    scaler = torch.amp.GradScaler(DEVICE) if precision == "fp16" else None
    objective = IntegrationObjective(ObjectiveWeights(dab_weight=0.0))
    torch.manual_seed(0)  # the same dropout masks in every precision
    torch.cuda.reset_peak_memory_stats()
    losses, times, skipped = [], [], 0
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
            out = _forward(model, batch)
        out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}
        loss, _ = objective(out, batch, batch["mask"])
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += int(scaler.get_scale() < scale)  # inf/NaN gradients: step skipped
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    timed = times[2:] or times  # the first steps include kernel selection and warm-up
    return {
        "precision": precision,
        "losses": losses,
        "finite": all(math.isfinite(v) for v in losses),
        "fp16_skipped_steps": skipped,
        "train_cells_per_s": BATCH / (sum(timed) / len(timed)),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def infer_cells_per_s(model: Any, batch: dict, dtype: Any, reps: int = 5) -> float:
    """Inference (eval, no_grad) throughput at the same batch."""
    import torch

    model.eval()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
        _forward(model, batch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            _forward(model, batch)
        torch.cuda.synchronize()
    model.train()
    return BATCH * reps / (time.perf_counter() - t0)


def model_checks(model_dir: Path, steps: int) -> dict[str, Any]:
    """Steps 2 and 3 of the module docstring on the model in ``model_dir``."""
    import torch

    from celltune.model import load_model

    model = load_model(model_dir, device=DEVICE)
    vocab = model.vocab
    batch = make_batch(model.config.ntoken, vocab.pad_id, vocab.cls_id, DEVICE)
    result: dict[str, Any] = {"sdpa": sdpa_backends(model, batch)}
    runs = [train_precision(model, batch, p, steps) for p in ("fp32", "bf16", "fp16")]
    first = runs[0]["losses"][0]
    for run in runs:
        run["first_loss_rel_diff"] = abs(run["losses"][0] - first) / max(abs(first), 1e-12)
        # fp16 must also take at least one step (GradScaler skips steps with inf grads)
        took_steps = run["fp16_skipped_steps"] < steps
        run["agrees"] = run["finite"] and run["first_loss_rel_diff"] <= LOSS_RTOL and took_steps
    result["precisions"] = runs
    result["inference_cells_per_s"] = {
        "fp32": infer_cells_per_s(model, batch, None),
        "bf16": infer_cells_per_s(model, batch, torch.bfloat16),
    }
    return result


def _run_cmd(name: str, cmd: list[str], timeout: int) -> dict[str, Any]:
    """One celltune command line; ok, seconds and the end of its output."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
        ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout} s"
    return {"name": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def command_checks(data: Path | None, work: Path, timeout: int) -> list[dict[str, Any]]:
    """``integrate`` / ``perturb train`` smoke runs with --device cuda, and under torchrun."""
    if data is None:
        note = "skipped: shipped data not found (set CELLTUNE_SHARED)"
        return [{"name": n, "ok": None, "seconds": 0, "tail": note} for n in ("commands",)]
    py = [sys.executable, "-m", "celltune"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    kang = data / "integration" / "kang2018_pbmc_ifnb_ctrl_stim_muscat_1556cells.h5ad"
    integ = [
        "integrate", str(kang), "--batch-key", "batch", "--epochs", "1", "--n-hvg", "600",
        "--baselines", "none", "--device", "cuda",
        "--quiet", "--set", "data.max_cells=600", "--set", "train.max_steps_per_epoch=8",
        "--set", "eval.umap=false",
    ]  # fmt: skip
    adamson = data / "perturbation" / "adamson2016_gears_mini_320x160.h5ad"
    prepared = work / "adamson_prepared.h5ad"
    checks = [
        _run_cmd("integrate --device cuda", [*py, *integ, "--out", str(work / "i1")], timeout),
        _run_cmd(
            "perturb prepare",
            [*py, "perturb", "prepare", str(adamson), "--out", str(prepared), "--not-raw"],
            timeout,
        ),
    ]
    ptrain = ["perturb", "train", str(prepared), "--out", str(work / "p1"), "--epochs", "1"]
    ptrain += ["--device", "cuda", "--quiet", "--set", "train.max_steps_per_epoch=8"]
    checks.append(_run_cmd("perturb train --device cuda", [*py, *ptrain], timeout))
    run1 = [*torchrun, "--nproc-per-node=1", "-m", "celltune", *integ]
    checks.append(
        _run_cmd("torchrun (1 process) integrate", [*run1, "--out", str(work / "i2")], timeout)
    )
    return checks


def nccl_check(model_dir: Path, work: Path, timeout: int) -> dict[str, Any]:
    """One torchrun process joins an NCCL group and trains the model under DDP."""
    out = work / "nccl.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    cmd += [str(Path(__file__).resolve()), "--nccl-worker", str(model_dir), str(out)]
    res = _run_cmd("torchrun NCCL DDP step", cmd, timeout)
    if out.is_file():
        res.update(json.loads(out.read_text()))
        res["ok"] = res["ok"] and res.get("finite", False)
    return res


def nccl_worker(model_dir: Path, out: Path) -> None:
    """Under torchrun: NCCL process group, DDP-wrapped model, two bf16 steps, all_reduce."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from celltune.model import load_model

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    model = load_model(model_dir, device=f"cuda:{local}").train()
    # heads the loss does not use (CLS, MVC) get no gradient: as celltune's Trainer does
    ddp = DistributedDataParallel(model, device_ids=[local], find_unused_parameters=True)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-4, fused=True)
    batch = make_batch(model.config.ntoken, model.vocab.pad_id, model.vocab.cls_id, "cuda")
    losses = []
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = _forward(ddp, batch)["mlm_output"].float()
        m = batch["mask"]
        loss = ((pred - batch["target_values"])[m] ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    t = torch.ones(1, device="cuda")
    dist.all_reduce(t)
    info = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
    info.update({"losses": losses, "finite": all(math.isfinite(v) for v in losses)})
    info["all_reduce"] = float(t)
    dist.destroy_process_group()
    out.write_text(json.dumps(info))


def print_table(report: dict[str, Any]) -> None:
    """The Markdown table of everything measured."""
    rows = [("GPU", report["gpu"]), ("model", report["model"])]
    rows += [(f"SDPA kernel ({k})", v) for k, v in report["checks"]["sdpa"].items()]
    for run in report["checks"]["precisions"]:
        rows.append(
            (
                f"train {run['precision']}",
                f"{run['train_cells_per_s']:.0f} cells/s, peak {run['peak_mem_gib']:.2f} GiB, "
                f"loss {run['losses'][0]:.4g}→{run['losses'][-1]:.4g} (Δ first "
                f"{run['first_loss_rel_diff']:.1e}, {run['fp16_skipped_steps']} skipped) "
                f"{'ok' if run['agrees'] else 'FAIL'}",
            )
        )
    for k, v in report["checks"]["inference_cells_per_s"].items():
        rows.append((f"inference {k}", f"{v:.0f} cells/s"))
    for c in [*report["commands"], report["nccl"]]:
        state = {True: "ok", False: "FAIL", None: "skipped"}[c["ok"]]
        extra = f" (backend {c['backend']})" if "backend" in c else ""
        rows.append((c["name"], f"{state} in {c['seconds']} s{extra}"))
    print("| check | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_check.json")
    p.add_argument("--steps", type=int, default=12, help="training steps per precision")
    p.add_argument("--nlayers", type=int, default=12)
    p.add_argument("--scgpt-wheel", type=Path, default=None, help="real gene names")
    p.add_argument("--timeout", type=int, default=150, help="seconds per command")
    p.add_argument("--nccl-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nccl_worker:
        nccl_worker(*args.nccl_worker)
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"{NO_GPU} (torch {torch.__version__}, CUDA build {torch.version.cuda}); exit 0")
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        note = build_model_dir(work / "model", args.nlayers, args.scgpt_wheel)
        report: dict[str, Any] = {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "model": f"{note['parameters']:,} parameters, {args.nlayers} layers, "
            f"{note['n_tokens']:,} tokens, batch {BATCH} x {SEQ}",
            "checks": model_checks(work / "model", args.steps),
            "commands": command_checks(shared_data(), work, args.timeout),
            "nccl": nccl_check(work / "model", work, args.timeout),
        }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['seconds']} s)")
    failed = [r for r in report["checks"]["precisions"] if not r["agrees"]]
    failed += [c for c in [*report["commands"], report["nccl"]] if c["ok"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
