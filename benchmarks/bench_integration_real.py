"""Training speed on real data: celltune's tokenisation vs the scGPT reference semantics.

One run, same model, same batch size, same integration objective (SPEC §4), the 12k-cell
Kang file with 1,200 HVGs and zero genes left out (as the reference integration script):

- ``reference``: scGPT's semantics emulated in celltune's model: every cell padded to the
  dataset's longest cell, attention dropout 0.2 (which forbids the fused attention kernel),
  random single-batch mini-batches;
- ``today``: celltune before issue 16: padded to the mini-batch's longest cell, random
  single-batch mini-batches, attention dropout 0;
- ``bucketed``: as ``today`` with the length-bucketed sampler.

A full epoch of the reference is far too slow on a 2-core CPU, so each mode times the
same ``--steps`` optimizer steps (after one warm-up step) and reports cells/s, tokens per
step and the ratio to the reference. Prints a table and writes JSON.

Run: ``python benchmarks/bench_integration_real.py --steps 10 --repeats 3``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata
import numpy as np
import torch

from celltune.data.dataset import CellDataset
from celltune.data.preprocess import preprocess
from celltune.data.sampler import BatchAwareSampler, LengthBucketedSampler
from celltune.data.vocab import GeneVocab
from celltune.tasks import integration as it

DATA = "../shared/data/integration/kang2018_pbmc_ctrl_8donors_muscat_12261cells.h5ad"


def _pad_to(batch: dict[str, torch.Tensor], L: int, pad_id: int, pad_value: float) -> dict:
    """Pad a collated mini-batch to ``L`` tokens (the reference pads to the dataset max)."""
    n = L - batch["gene_ids"].shape[1]
    if n <= 0:
        return batch
    out = dict(batch)
    B = batch["gene_ids"].shape[0]
    out["gene_ids"] = torch.cat([batch["gene_ids"], torch.full((B, n), pad_id)], 1)
    for k in ("values", "target_values"):
        out[k] = torch.cat([batch[k], torch.full((B, n), pad_value)], 1)
    out["padding_mask"] = torch.cat([batch["padding_mask"], torch.ones(B, n, dtype=torch.bool)], 1)
    return out


def _time_mode(mode: str, a: argparse.Namespace, pp, vocab, gene_ids, seed: int) -> dict:
    cfg = it.IntegrationConfig()
    cfg.data.batch_key = "batch"
    cfg.tokens.include_zero_gene = False
    cfg.model.d_model, cfg.model.nlayers, cfg.model.d_hid = a.d_model, a.nlayers, a.d_hid
    cfg.model.attn_dropout = 0.2 if mode == "reference" else 0.0
    cfg.train.batch_size = a.batch_size
    ds = CellDataset(pp, gene_ids, layer="X_binned", batch_key="batch")
    coll, _, _ = it.collators(cfg, vocab, gene_ids)
    lengths = np.diff(ds.X.indptr)
    L_max = int(lengths.max()) + 1
    n_b = len(ds.batch_categories)
    torch.manual_seed(seed)
    model = it._build_model(cfg, vocab, n_b, None)
    objective = it._objective(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if mode == "bucketed":
        sampler = LengthBucketedSampler(ds.batch_labels, lengths, a.batch_size, seed=seed)
    else:
        sampler = BatchAwareSampler(ds.batch_labels, a.batch_size, seed=seed)
    batches = iter(sampler)
    n_cells = tokens = 0
    t0 = 0.0
    for step in range(a.steps + 1):
        if step == 1:  # the first step is warm-up
            t0, n_cells, tokens = time.perf_counter(), 0, 0
        b = coll([ds[i] for i in next(batches)])
        if mode == "reference":
            b = _pad_to(b, L_max, vocab.pad_id, cfg.tokens.pad_value)
        out = it._forward(model, model, b, cfg)
        mask = b["values"].eq(cfg.tokens.mask_value) & ~b["padding_mask"]
        loss, _ = objective(out, b, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n_cells += b["gene_ids"].shape[0]
        tokens += b["gene_ids"].numel()
    dt = time.perf_counter() - t0
    return {
        "mode": mode,
        "seed": seed,
        "cells_per_s": n_cells / dt,
        "seconds": dt,
        "tokens_per_step": tokens / a.steps,
        "steps": a.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--nlayers", type=int, default=4)
    ap.add_argument("--d-hid", type=int, default=128)
    ap.add_argument("--json", default="benchmarks/results/integration_real.json")
    a = ap.parse_args()
    ad = anndata.read_h5ad(a.data)
    pp = preprocess(ad, n_hvg=1200, batch_key="batch")
    genes = list(pp.var_names.astype(str))
    vocab = GeneVocab.from_genes(genes)
    gene_ids = np.asarray(vocab.match_genes(genes).ids, dtype=np.int64)
    rows = []
    for rep in range(a.repeats):  # modes interleaved so machine load hits all alike
        for mode in ("reference", "today", "bucketed"):
            r = _time_mode(mode, a, pp, vocab, gene_ids, seed=rep)
            rows.append(r)
            print(
                f"{mode:9} rep {rep}: {r['cells_per_s']:7.1f} cells/s, "
                f"{r['tokens_per_step']:8.0f} tokens/step",
                flush=True,
            )
    summary = {}
    for mode in ("reference", "today", "bucketed"):
        v = np.array([r["cells_per_s"] for r in rows if r["mode"] == mode])
        summary[mode] = {
            "cells_per_s_median": float(np.median(v)),
            "min": float(v.min()),
            "max": float(v.max()),
        }
    ref = summary["reference"]["cells_per_s_median"]
    today = summary["today"]["cells_per_s_median"]
    print(f"\n{'mode':10}{'cells/s (median, min-max)':>30}{'x reference':>13}{'x today':>9}")
    for mode, s in summary.items():
        print(
            f"{mode:10}{s['cells_per_s_median']:>14.1f} ({s['min']:.1f}-{s['max']:.1f})"
            f"{s['cells_per_s_median'] / ref:>13.2f}{s['cells_per_s_median'] / today:>9.2f}"
        )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(
        json.dumps({"args": vars(a), "rows": rows, "summary": summary}, indent=1)
    )


if __name__ == "__main__":
    main()
