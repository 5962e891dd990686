"""Throughput and peak memory of CellTransformer vs the scGPT reference (CPU).

Measures, per configuration, a training step (forward + backward + Adam) and inference
(eval, no_grad) in cells/s, and the peak resident memory (``ru_maxrss``) of a separate
subprocess per measurement, so one measurement's memory never hides another's.

Configurations (SPEC §4 / §6):
- ``integration``: d=128, 4 layers, 4 heads, d_hid=128, 1,201 tokens, dropout 0.2,
  batch labels + DSBN + DAB + MVC + ECS + explicit zero probability (the
  ``finetune_integration.py`` objective), vocabulary of 1,200 HVGs + 3 specials.
- ``perturbation``: generator (perturbation flags, affine decoder), d=128, 4 layers,
  4 heads, 1,536 tokens, dropout 0 (the tutorial's), vocabulary 5,063.
- ``whole_human``: the published whole-human model's shape (d=512, 12 layers, 8 heads,
  d_hid=512, a vocabulary of 48,292 genes + 3 specials, 1,201 tokens, dropout 0.2) with
  the integration objective. celltune trains it three ways (``--finetune`` full, LoRA
  rank 8 on ``in_proj,out_proj,linear1,linear2``, freeze: embeddings + the first 6 layers
  frozen); the reference trains every weight (scGPT has no other mode). All at
  ``--ref-batch-size`` on identical inputs; rows also carry the ratio to celltune's full
  fine-tuning (``speedup_vs_full``, ``mem_ratio_vs_full``).

The scGPT reference (``pip install --no-deps scgpt==0.2.4``) cannot be imported as a
package here (torchtext, flash-attn, IPython ...): only ``scgpt.model.model`` /
``generation_model`` are loaded, with stub parent packages registered in
``sys.modules`` inside this script. Pass ``--ref-path`` (the directory that contains
the ``scgpt`` folder) when it is not on ``sys.path``.

    python benchmarks/bench_model.py --batch-size 64 --steps 3 \
        --ref-batch-size 8 --ref-steps 1 --out benchmarks/results/bench_model.json
    python benchmarks/bench_model.py --configs whole_human --ref-batch-size 8 --steps 1 \
        --ref-steps 1 --out benchmarks/results/bench_model_whole_human.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS: dict[str, dict[str, Any]] = {
    "integration": dict(
        ntoken=1203,
        seq_len=1201,
        d_model=128,
        nhead=4,
        d_hid=128,
        nlayers=4,
        dropout=0.2,
        generator=False,
    ),
    "perturbation": dict(
        ntoken=5063,
        seq_len=1536,
        d_model=128,
        nhead=4,
        d_hid=128,
        nlayers=4,
        dropout=0.0,
        generator=True,
    ),
    "whole_human": dict(
        ntoken=48295,
        seq_len=1201,
        d_model=512,
        nhead=8,
        d_hid=512,
        nlayers=12,
        dropout=0.2,
        generator=False,
    ),
}

#: celltune's fine-tuning modes measured on ``whole_human`` (the reference trains all).
FINETUNE_MODES = ("full", "lora", "freeze")
FREEZE_LAYERS = 6


# ----------------------------------------------------------------------------- inputs
def make_inputs(cfg: dict[str, Any], batch: int, seed: int = 0) -> dict[str, Any]:
    """Synthetic tokens with the statistics of real binned data (35% zeros, 40% masked)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    B, L, ntoken = batch, cfg["seq_len"], cfg["ntoken"]
    n_genes = ntoken - 3
    genes = torch.stack([torch.randperm(n_genes, generator=g)[: L - 1] for _ in range(B)])
    target = torch.randint(1, 51, (B, L), generator=g).float()
    target[torch.rand(B, L, generator=g) < 0.35] = 0
    if cfg["generator"]:
        gene_ids = genes[:, :L] if n_genes >= L else genes
        gene_ids = torch.cat([gene_ids, torch.randint(0, n_genes, (B, 1), generator=g)], 1)
        values = torch.log1p(target)
        flags = torch.zeros(B, L, dtype=torch.long)
        flags[:, 3] = 1
        return dict(
            gene_ids=gene_ids,
            values=values,
            target=torch.log1p(target),
            pert_flags=flags,
            padding_mask=torch.zeros(B, L, dtype=torch.bool),
        )
    cls = torch.full((B, 1), ntoken - 2)
    gene_ids = torch.cat([cls, genes], 1)
    target[:, 0] = 0
    values = target.clone()
    mask = torch.rand(B, L, generator=g) < 0.4
    mask[:, 0] = False
    values[mask] = -1
    return dict(
        gene_ids=gene_ids,
        values=values,
        target=target,
        mask=mask,
        padding_mask=torch.zeros(B, L, dtype=torch.bool),
        batch_labels=torch.zeros(B, dtype=torch.long),
    )


# ----------------------------------------------------------------------------- models
def build_celltune(cfg: dict[str, Any], attn_dropout: float, grad_checkpoint: bool = False) -> Any:
    from celltune.model import CellTransformer, ModelConfig

    common = dict(
        ntoken=cfg["ntoken"],
        d_model=cfg["d_model"],
        nhead=cfg["nhead"],
        d_hid=cfg["d_hid"],
        nlayers=cfg["nlayers"],
        dropout=cfg["dropout"],
        pad_id=cfg["ntoken"] - 3,
        attn_dropout=attn_dropout,
        grad_checkpoint=grad_checkpoint,
    )
    if cfg["generator"]:
        conf = ModelConfig(
            **common,
            pad_value=0,
            generator=True,
            decoder="affine",
            do_mvc=False,
            explicit_zero_prob=False,
        )
    else:
        conf = ModelConfig(
            **common,
            pad_value=-2,
            do_mvc=True,
            do_dab=True,
            use_batch_labels=True,
            num_batch_labels=2,
            domain_spec_batchnorm=True,
            explicit_zero_prob=True,
        )
    return CellTransformer(conf)


def import_reference(ref_path: str | None) -> types.ModuleType:
    """Load scgpt's model modules without its package __init__ (which needs torchtext...)."""
    if ref_path:
        sys.path.insert(0, ref_path)
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scgpt is not installed (pip install --no-deps scgpt==0.2.4)")
    pkg_dir = next(iter(spec.submodule_search_locations))
    pkg = types.ModuleType("scgpt")
    pkg.__path__ = [pkg_dir]  # type: ignore[attr-defined]
    pkg.logger = logging.getLogger("scGPT")  # type: ignore[attr-defined]
    sys.modules["scgpt"] = pkg
    sub = types.ModuleType("scgpt.model")
    sub.__path__ = [os.path.join(pkg_dir, "model")]  # type: ignore[attr-defined]
    sys.modules["scgpt.model"] = sub
    utils = types.ModuleType("scgpt.utils")

    def map_raw_id_to_vocab_id(raw_ids: Any, gene_ids: Any) -> Any:  # generation_model import
        return gene_ids[raw_ids]

    utils.map_raw_id_to_vocab_id = map_raw_id_to_vocab_id  # type: ignore[attr-defined]
    sys.modules["scgpt.utils"] = utils
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_mod = importlib.import_module("scgpt.model.model")
        gen_mod = importlib.import_module("scgpt.model.generation_model")
    ns = types.ModuleType("scgpt_ref")
    ns.TransformerModel = model_mod.TransformerModel  # type: ignore[attr-defined]
    ns.TransformerGenerator = gen_mod.TransformerGenerator  # type: ignore[attr-defined]
    return ns


def build_reference(cfg: dict[str, Any], ref_path: str | None, ours: Any) -> Any:
    ref = import_reference(ref_path)
    vocab = {"<pad>": cfg["ntoken"] - 3}
    common = dict(
        ntoken=cfg["ntoken"],
        d_model=cfg["d_model"],
        nhead=cfg["nhead"],
        d_hid=cfg["d_hid"],
        nlayers=cfg["nlayers"],
        nlayers_cls=3,
        n_cls=1,
        vocab=vocab,
        dropout=cfg["dropout"],
        pad_token="<pad>",
        use_fast_transformer=False,
    )
    if cfg["generator"]:
        model = ref.TransformerGenerator(
            **common,
            pad_value=0,
            pert_pad_id=0,
            do_mvc=False,
            n_input_bins=0,
            explicit_zero_prob=False,
        )
    else:
        model = ref.TransformerModel(
            **common,
            pad_value=-2,
            do_mvc=True,
            do_dab=True,
            use_batch_labels=True,
            num_batch_labels=2,
            domain_spec_batchnorm=True,
            input_emb_style="continuous",
            n_input_bins=51,
            ecs_threshold=0.8,
            explicit_zero_prob=True,
        )
    model.load_state_dict(ours.state_dict())  # same weights, same keys
    return model


# ----------------------------------------------------------------------------- worker
def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from celltune.losses import IntegrationObjective, PerturbationObjective

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = CONFIGS[args.config]
    ours = build_celltune(cfg, args.attn_dropout, bool(args.grad_checkpoint))
    model = build_reference(cfg, args.ref_path, ours) if args.impl == "scgpt" else ours
    if args.impl == "celltune" and args.finetune != "full":
        from celltune.model.finetune import FinetuneSpec, apply_finetune

        apply_finetune(model, FinetuneSpec(mode=args.finetune, freeze_layers=FREEZE_LAYERS))
    full = make_inputs(cfg, args.batch_size)
    warm = {k: v[:2] for k, v in full.items()}  # warm-up on 2 cells: cheap, same code paths
    x = full
    objective = PerturbationObjective() if cfg["generator"] else IntegrationObjective()

    def forward(train: bool) -> Any:
        if cfg["generator"]:
            return model(
                x["gene_ids"], x["values"], x["pert_flags"], src_key_padding_mask=x["padding_mask"]
            )
        return model(
            x["gene_ids"],
            x["values"],
            src_key_padding_mask=x["padding_mask"],
            batch_labels=x["batch_labels"],
            MVC=train,
            ECS=train,
        )

    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times: list[float] = []
    cpu: list[float] = []
    if args.mode == "train":
        model.train()
        # Each side uses the optimizer it trains with: celltune's loop uses fused Adam,
        # scGPT's scripts the default (per-parameter) Adam.
        trainable = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.Adam(trainable, lr=1e-4, fused=args.impl != "scgpt")
        for i in range(args.steps + 1):  # step 0 is a warm-up on 2 cells
            x = warm if i == 0 else full
            batch = {"target_values": x["target"], "batch_labels": x.get("batch_labels")}
            t0, c0 = time.perf_counter(), time.process_time()
            out = forward(True)
            loss, _ = objective(out, batch, x.get("mask"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    else:
        model.eval()
        with torch.no_grad():
            for i in range(args.steps + 1):
                x = warm if i == 0 else full
                t0, c0 = time.perf_counter(), time.process_time()
                forward(False)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    step = sum(times[1:]) / (len(times) - 1)
    cpu_step = sum(cpu[1:]) / (len(cpu) - 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return dict(
        impl=args.impl,
        config=args.config,
        mode=args.mode,
        batch_size=args.batch_size,
        attn_dropout=args.attn_dropout,
        grad_checkpoint=bool(args.grad_checkpoint),
        finetune=args.finetune if args.impl == "celltune" else "full",
        trainable_params=sum(q.numel() for q in model.parameters() if q.requires_grad),
        steps=args.steps,
        sec_per_step=step,
        cells_per_s=args.batch_size / step,
        cpu_s_per_step=cpu_step,
        cells_per_cpu_s=args.batch_size / cpu_step,
        peak_rss_gib=peak,
        setup_rss_gib=rss_setup,
        threads=args.threads,
    )


def spawn(base: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess (its own ru_maxrss)."""
    cmd = [sys.executable, __file__, "--worker", "--threads", str(base.threads)]
    for key, value in kw.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if base.ref_path:
        cmd += ["--ref-path", base.ref_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return dict(kw, error=tail[0])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument(
        "--ref-batch-size",
        type=int,
        default=8,
        help="batch size for the scGPT reference (64 needs ~21 GiB); celltune is "
        "also run at this size for a like-for-like ratio",
    )
    p.add_argument("--ref-steps", type=int, default=1)
    p.add_argument("--ref-path", default=os.environ.get("CELLTUNE_SCGPT_PATH"))
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--configs", default="integration,perturbation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_model.json"))
    # worker-only options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="celltune", help=argparse.SUPPRESS)
    p.add_argument("--config", default="integration", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    p.add_argument("--attn-dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--grad-checkpoint", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--finetune", default="full", choices=FINETUNE_MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    ref_ok, ref_msg = not args.no_reference, ""
    if ref_ok:
        try:
            import_reference(args.ref_path)
        except Exception as err:  # any import failure means "not importable"
            ref_ok, ref_msg = False, f"reference not importable: {err}"
    else:
        ref_msg = "reference not run (--no-reference)"

    rows: list[dict[str, Any]] = []
    for name in args.configs.split(","):
        drop = CONFIGS[name]["dropout"]
        plan: list[dict[str, Any]] = []
        big = dict(impl="celltune", config=name, batch_size=args.batch_size, steps=args.steps)
        small = dict(config=name, batch_size=args.ref_batch_size)
        if name == "whole_human":  # one batch size, so every ratio is like for like
            for mode in FINETUNE_MODES:
                plan.append(dict(small, impl="celltune", mode="train", steps=args.steps,
                                 attn_dropout=0.0, finetune=mode))  # fmt: skip
            plan.append(dict(small, impl="celltune", mode="infer", steps=args.steps))
            if ref_ok:
                for mode in ("train", "infer"):
                    plan.append(
                        dict(
                            small, impl="scgpt", mode=mode, steps=args.ref_steps, attn_dropout=drop
                        )
                    )
            for job in plan:
                res = spawn(args, **job)
                rows.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
            continue
        plan.append(dict(big, mode="train", attn_dropout=0.0))
        if name == "integration":
            plan.append(dict(big, mode="train", attn_dropout=0.0, grad_checkpoint=1))
        plan.append(dict(big, mode="infer", attn_dropout=0.0))
        if ref_ok:
            for mode in ("train", "infer"):
                if args.ref_batch_size != args.batch_size:  # else measured above already
                    plan.append(
                        dict(small, impl="celltune", mode=mode, steps=args.steps, attn_dropout=0.0)
                    )
                if drop > 0 and mode == "train":  # scGPT-exact attention dropout
                    plan.append(
                        dict(small, impl="celltune", mode=mode, steps=args.steps, attn_dropout=drop)
                    )
                plan.append(
                    dict(small, impl="scgpt", mode=mode, steps=args.ref_steps, attn_dropout=drop)
                )
        for job in plan:
            res = spawn(args, **job)
            rows.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)

    # ratios at equal batch size: celltune (default attn_dropout=0) vs scGPT
    for r in rows:
        if r.get("impl") != "celltune" or "error" in r:
            continue
        ref = next(
            (
                q
                for q in rows
                if q.get("impl") == "scgpt"
                and "error" not in q
                and q["config"] == r["config"]
                and q["mode"] == r["mode"]
                and q["batch_size"] == r["batch_size"]
            ),
            None,
        )
        if ref:
            r["speedup_vs_scgpt"] = r["cells_per_s"] / ref["cells_per_s"]
            r["cpu_speedup_vs_scgpt"] = r["cells_per_cpu_s"] / ref["cells_per_cpu_s"]
            r["mem_ratio_vs_scgpt"] = r["peak_rss_gib"] / ref["peak_rss_gib"]
        full = next(
            (
                q
                for q in rows
                if q.get("impl") == "celltune"
                and "error" not in q
                and q.get("finetune") == "full"
                and q["config"] == r["config"]
                and q["mode"] == "train"
                and q["batch_size"] == r["batch_size"]
                and not q.get("grad_checkpoint")
                and q.get("attn_dropout", 0.0) == 0.0
            ),
            None,
        )
        if full is not None and r["mode"] == "train" and r.get("finetune") != "full":
            r["speedup_vs_full"] = r["cells_per_s"] / full["cells_per_s"]
            r["mem_ratio_vs_full"] = r["peak_rss_gib"] / full["peak_rss_gib"]

    header = (
        f"{'impl':9} {'config':13} {'mode':5} {'tune':6} {'batch':>5} {'attn_drop':>9} "
        f"{'ckpt':>4} {'cells/s':>8} {'cells/cpu-s':>11} {'peak GiB':>9} {'speedup':>8} "
        f"{'mem ratio':>9} {'vs full':>8} {'mem/full':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(
                f"{r['impl']:9} {r['config']:13} {r['mode']:5} {r['batch_size']:>5} "
                f"ERROR {r['error']}"
            )
            continue
        sp = f"{r['speedup_vs_scgpt']:.1f}x" if "speedup_vs_scgpt" in r else "-"
        mr = f"{r['mem_ratio_vs_scgpt']:.2f}" if "mem_ratio_vs_scgpt" in r else "-"
        sf = f"{r['speedup_vs_full']:.2f}x" if "speedup_vs_full" in r else "-"
        mf = f"{r['mem_ratio_vs_full']:.2f}" if "mem_ratio_vs_full" in r else "-"
        ck = "yes" if r.get("grad_checkpoint") else "no"
        tune = r.get("finetune", "full") if r["mode"] == "train" else "-"
        print(
            f"{r['impl']:9} {r['config']:13} {r['mode']:5} {tune:6} {r['batch_size']:>5} "
            f"{r.get('attn_dropout', 0.0):>9.1f} {ck:>4} {r['cells_per_s']:>8.2f} "
            f"{r['cells_per_cpu_s']:>11.2f} {r['peak_rss_gib']:>9.2f} {sp:>8} {mr:>9} "
            f"{sf:>8} {mf:>8}"
        )
    if ref_msg:
        print(ref_msg)
    import torch

    from celltune.files import write_json_atomic

    write_json_atomic(
        args.out,
        dict(
            rows=rows,
            reference=ref_msg or "imported",
            torch=torch.__version__,
            threads=args.threads,
            cpu_count=os.cpu_count(),
        ),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
