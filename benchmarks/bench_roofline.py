"""Roofline figure: achieved FLOP/s of an integration training step vs measured matmul peak.

1. **Peak**: the best of several fp32 ``torch.mm`` runs (square matrices, sizes below),
   with the same thread count as the step, in GFLOP/s (2·n³ per product).
2. **Step**: one integration-configuration training step (SPEC §4: d=128, 4 layers,
   4 heads, d_hid=128, 1,201 tokens, DSBN + batch labels + DAB + MVC + ECS + explicit
   zero probability, Adam, clipping) on real Kang PBMC cells tokenised by celltune.
   FLOPs are counted analytically (multiply-add = 2 FLOPs; see :func:`step_flops`):
   the matmuls of the encoders, attention projections, attention scores and
   weighted sums, feed-forward, expression / zero-probability decoders, MVC decoder,
   DAB discriminator; a training step = 3 × forward (backward ≈ 2 × forward).
   Element-wise work (LayerNorm, softmax, dropout, Adam) is not counted: it is memory
   bound and is what keeps a step from reaching the matmul peak.
3. **bf16**: the same step under ``torch.autocast("cpu", torch.bfloat16)`` vs fp32 (time
   ratio), and whether the outputs agree: the same weights and inputs in eval mode,
   relative error of the expression prediction and the cell embedding, and the loss.

    python benchmarks/bench_roofline.py                 # ~3-4 min on 2 cores
    python benchmarks/bench_roofline.py --batch-size 8 --steps 2   # quicker

Writes ``bench_out/roofline.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import (  # noqa: E402  (script-relative import)
    DONORS,
    MAX_SEQ_LEN,
    build_model,
    collator,
    integration_step,
)


def matmul_peak(sizes: list[int], repeats: int = 5) -> dict[str, float]:
    """Best fp32 GFLOP/s of ``torch.mm`` over ``sizes`` (2·n³ FLOPs per product)."""
    import torch

    best: dict[str, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        best[str(n)] = 2 * n**3 / min(times) / 1e9
    return best


def step_flops(B: int, L: int, d: int, d_hid: int, nlayers: int, n_batches: int) -> dict[str, int]:
    """Analytic forward FLOPs of the integration model on B cells × L tokens.

    Per token: value encoder Linear(1,d)+Linear(d,d); per layer QKV (3·d·d), output
    projection (d·d), scores QKᵀ and weights·V (2·L·d), FFN (2·d·d_hid); the expression
    decoder and the zero-probability decoder (each d_in→d→d→1 with d_in = 2d because the
    batch embedding is concatenated); the MVC decoder per gene (query Linear(d,d), W:
    d→2d, inner product with the cell embedding). Per cell: DAB discriminator
    (d→d→d→n_batches) and the ECS similarity matrix (B×B×d).
    """
    tokens = B * L
    mac = {
        "value_encoder": tokens * (d + d * d),
        "attention_proj": nlayers * tokens * 4 * d * d,
        "attention_scores": nlayers * B * 2 * L * L * d,
        "ffn": nlayers * tokens * 2 * d * d_hid,
        "expr_decoders": 2 * tokens * (2 * d * d + d * d + d),
        "mvc_decoder": tokens * (d * d + d * 2 * d + 2 * d) * 2,  # value and zero logits
        "dab_ecs": B * (2 * d * d + d * n_batches) + B * B * d,
    }
    flops = {k: 2 * v for k, v in mac.items()}
    flops["forward"] = sum(flops.values())
    flops["train_step"] = 3 * flops["forward"]
    return flops


def real_batch(batch_size: int, seed: int = 0) -> tuple[dict[str, Any], int, int]:
    """One batch-aware mini-batch of real cells, streamed and tokenised by celltune."""
    import numpy as np

    from celltune.data.streaming import StreamingCellDataset

    hvg_file = ROOT / "bench_out" / "cache" / f"hvg_{DONORS.stem}.json"
    if hvg_file.is_file():
        cols = np.asarray(json.loads(hvg_file.read_text()))
    else:  # first 1,200 genes: the FLOP count only needs the shape
        cols = np.arange(MAX_SEQ_LEN - 1)
    ds = StreamingCellDataset(
        DONORS,
        np.arange(cols.size),
        var_subset=cols,
        batch_key="batch",
        batch_size=batch_size,
        seed=seed,
        drop_last=True,
    )
    batch = next(iter(ds.loader(collator(cols.size))))
    return batch, int(cols.size), len(ds.batch_categories)


def time_steps(model: Any, batch: dict[str, Any], steps: int, amp: bool) -> list[float]:
    import contextlib

    import torch

    from celltune.losses import IntegrationObjective

    objective = IntegrationObjective()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            loss = integration_step(model, objective, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def agreement(model: Any, batch: dict[str, Any]) -> dict[str, float]:
    """fp32 vs bf16-autocast outputs of the same weights on the same cells (eval mode)."""
    import torch

    from celltune.losses import IntegrationObjective

    objective = IntegrationObjective()
    model.eval()
    res = {}
    with torch.no_grad():
        outs = []
        losses = []
        for amp in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(
                    batch["gene_ids"],
                    batch["values"],
                    padding_mask=batch["padding_mask"],
                    batch_labels=batch["batch_labels"],
                    MVC=True,
                )
                mask = batch["values"].eq(-1.0) & ~batch["padding_mask"]
                losses.append(float(objective(out, batch, mask)[0]))
            outs.append({k: v.float() for k, v in out.items() if isinstance(v, torch.Tensor)})
    for key in ("mlm_output", "cell_emb", "mvc_output"):
        a, b = outs[0][key], outs[1][key]
        res[f"{key}_rel_err"] = float((a - b).norm() / a.norm().clamp_min(1e-12))
    cos = torch.nn.functional.cosine_similarity(outs[0]["cell_emb"], outs[1]["cell_emb"], dim=1)
    res["cell_emb_min_cosine"] = float(cos.min())
    res["loss_fp32"], res["loss_bf16"] = losses
    res["loss_rel_diff"] = abs(losses[1] - losses[0]) / abs(losses[0])
    return res


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed fp32 steps after one warm-up")
    p.add_argument(
        "--bf16-steps", type=int, default=1, help="timed bf16 steps (slow without AMX/AVX512-BF16)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--tolerance", type=float, default=0.05, help="bf16 relative-error bound")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "roofline.json"))
    args = p.parse_args()

    import torch

    from celltune.files import write_json_atomic

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    peaks = matmul_peak([int(s) for s in args.sizes.split(",")])
    peak = max(peaks.values())
    batch, n_genes, n_batches = real_batch(args.batch_size)
    B, L = batch["gene_ids"].shape
    torch.manual_seed(0)
    model = build_model(n_genes, n_batches)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = time_steps(model, batch, args.steps, amp=False)
    model.load_state_dict(state)
    bf16 = time_steps(model, batch, args.bf16_steps, amp=True)
    model.load_state_dict(state)
    agree = agreement(model, batch)
    peak_after = max(matmul_peak([max(int(s) for s in args.sizes.split(","))]).values())
    # The machine's peak is the best seen: a lower reading only means other load then.
    peak = max(peak, peak_after)

    flops = step_flops(B, L, 128, 128, 4, n_batches)
    t32, t16 = min(fp32), min(bf16)
    achieved = flops["train_step"] / t32 / 1e9
    achieved_bf16 = flops["train_step"] / t16 / 1e9
    within = all(agree[f"{k}_rel_err"] < args.tolerance for k in ("mlm_output", "cell_emb"))
    result = {
        "threads": args.threads,
        "batch": [int(B), int(L)],
        "matmul_peak_gflops": peaks,
        "matmul_peak_gflops_best": peak,
        "matmul_peak_gflops_after": peak_after,
        "flops_per_step": flops,
        "fp32_step_s": fp32,
        "bf16_step_s": bf16,
        "achieved_gflops_fp32": achieved,
        "fraction_of_peak_fp32": achieved / peak,
        "achieved_gflops_bf16_fp32_equiv": achieved_bf16,
        "bf16_speedup": t32 / t16,
        "bf16_agreement": agree,
        "bf16_within_tolerance": within,
        "tolerance": args.tolerance,
        "wall_s": time.perf_counter() - t_all,
    }
    write_json_atomic(args.out, result)

    print(
        f"{args.threads} threads, batch {B} × {L} tokens (real Kang cells), best of "
        f"{args.steps} fp32 / {args.bf16_steps} bf16 steps"
    )
    print("| quantity | value |")
    print("|---|---|")
    print(
        f"| fp32 matmul peak (GFLOP/s; best of before/after, sizes {args.sizes}) | "
        f"{peak:.1f} (before: {max(peaks.values()):.1f}, after: {peak_after:.1f}) |"
    )
    print(f"| FLOPs per training step (analytic, 3× fwd) | {flops['train_step'] / 1e9:.1f} G |")
    print(
        f"|  of which attention scores / projections / FFN | "
        f"{3 * flops['attention_scores'] / 1e9:.1f} / {3 * flops['attention_proj'] / 1e9:.1f}"
        f" / {3 * flops['ffn'] / 1e9:.1f} G |"
    )
    print(f"| fp32 step time | {t32:.2f} s ({B / t32:.1f} cells/s) |")
    print(f"| achieved fp32 | {achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of peak |")
    print(
        f"| bf16 autocast step time | {t16:.2f} s ({B / t16:.1f} cells/s; {t32 / t16:.2f}× fp32) |"
    )
    print(
        f"| bf16 vs fp32 rel. error: expression / cell emb / MVC | "
        f"{agree['mlm_output_rel_err']:.2e} / {agree['cell_emb_rel_err']:.2e} / "
        f"{agree['mvc_output_rel_err']:.2e} |"
    )
    print(
        f"| bf16 vs fp32 loss | {agree['loss_bf16']:.4f} vs {agree['loss_fp32']:.4f} "
        f"({100 * agree['loss_rel_diff']:.2f}%) |"
    )
    print(
        f"bf16 within tolerance {args.tolerance}: {within}; goal ≥ 40% of peak: "
        f"{'met' if achieved / peak >= 0.4 else 'NOT met'}"
    )
    print(f"wrote {args.out} ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
