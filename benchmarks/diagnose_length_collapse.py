"""How much of a cell embedding is sequence length? Participation ratio of the embedding's
PCA spectrum and |corr(PC1, n_expressed_genes)| for tokenisation / pooling variants.

Run: ``python benchmarks/diagnose_length_collapse.py [H5AD] [--steps N]``. With ``--steps 0``
the model is untrained (what the architecture does before any learning); with N > 0 each
variant is first trained N optimizer steps with the integration objective (MLM only here,
so the comparison isolates tokenisation and pooling). Prints a table, writes JSON.
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
from celltune.data.vocab import GeneVocab
from celltune.eval.embedding_checks import length_correlation, participation_ratio
from celltune.model.config import ModelConfig
from celltune.model.model import CellTransformer

DEFAULT = "../shared/data/integration/kang2018_pbmc_ifnb_ctrl_stim_muscat_1556cells.h5ad"


def _variant(pp, vocab, gene_ids, *, zeros: bool, pool: str, steps: int, seed: int):
    torch.manual_seed(seed)
    nb = int(pp.obs["batch"].astype("category").cat.categories.size)
    mc = ModelConfig(
        ntoken=vocab.ntoken,
        d_model=64,
        nhead=4,
        d_hid=128,
        nlayers=2,
        n_cls=1,
        pad_id=vocab.pad_id,
        cell_emb_style=pool,
        use_batch_labels=False,
        num_batch_labels=nb,
        domain_spec_batchnorm=True,
        explicit_zero_prob=False,
    )
    model = CellTransformer(mc, vocab=vocab)
    ds = CellDataset(pp, gene_ids, layer="X_binned", batch_key="batch")
    coll = ds.collator(
        cls_id=vocab.cls_id,
        pad_id=vocab.pad_id,
        include_zero_gene=zeros,
        max_seq_len=1201,
        mask_ratio=0.4,
        seed=seed,
    )
    from celltune.data.sampler import BatchAwareSampler

    sampler = BatchAwareSampler(ds.batch_labels, 32, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        for idx in sampler:
            b = coll([ds[i] for i in idx])
            out = model(
                b["gene_ids"],
                b["values"],
                padding_mask=b["padding_mask"],
                batch_labels=b["batch_labels"],
            )
            m = b["values"].eq(-1) & ~b["padding_mask"]
            loss = ((out["mlm_output"] - b["target_values"]) ** 2)[m].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
        sampler.set_epoch(sampler.epoch + 1)
    ecoll = ds.collator(
        cls_id=vocab.cls_id,
        pad_id=vocab.pad_id,
        include_zero_gene=zeros,
        max_seq_len=1201,
        mask_ratio=0.0,
        seed=seed,
    )
    embs = []
    for s in range(0, len(ds), 128):
        b = ecoll([ds[i] for i in range(s, min(s + 128, len(ds)))])
        embs.append(model.embed(b["gene_ids"], b["values"], b["padding_mask"], b["batch_labels"]))
    emb = torch.cat(embs).numpy()
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    n_expr = np.diff(ds.X.indptr)
    return {
        "include_zero_gene": zeros,
        "pooling": pool,
        "steps": steps,
        "seed": seed,
        "participation_ratio": participation_ratio(emb),
        "abs_corr_pc1_n_expressed": length_correlation(emb, n_expr),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/length_collapse.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    ad = anndata.read_h5ad(a.data)
    pp = preprocess(ad, n_hvg=1200, batch_key="batch")
    genes = list(pp.var_names.astype(str))
    vocab = GeneVocab.from_genes(genes)
    gene_ids = np.asarray(vocab.match_genes(genes).ids, dtype=np.int64)
    rows = []
    for seed in range(a.seeds):
        for zeros in (True, False):
            for pool in ("cls", "avg-pool"):
                r = _variant(pp, vocab, gene_ids, zeros=zeros, pool=pool, steps=a.steps, seed=seed)
                rows.append(r)
                print(
                    f"zeros={zeros!s:5} pool={pool:8} steps={a.steps:4} seed={seed} "
                    f"PR={r['participation_ratio']:6.2f} |r(PC1,n_expr)|="
                    f"{r['abs_corr_pc1_n_expressed']:.3f} ({r['seconds']:.0f}s)",
                    flush=True,
                )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"data": a.data, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
