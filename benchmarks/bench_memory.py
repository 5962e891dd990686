"""Peak memory vs number of cells: streaming from disk vs scGPT's up-front tokenisation.

The real 12,261-cell, 8-donor Kang PBMC file is replicated 1×, 10×, 50× and 100× (up to
1.23M cells) into sparse CSR ``.h5ad`` files in a cache directory (written once, chunk by
chunk, with :func:`celltune.data.replicate.replicate_h5ad`). For every size, a fresh
subprocess measures its peak resident memory (``ru_maxrss``) while it

- ``stream-train``: opens the file with :class:`~celltune.data.streaming.StreamingCellDataset`
  (batch-aware, shuffled, binning + tokenising per mini-batch) and trains the integration
  configuration (d=128, 4 layers, 1,200 HVGs + ``<cls>``, DSBN, DAB, MVC, ECS, explicit
  zero probability) for a few Adam steps;
- ``stream-embed``: embeds a few mini-batches in eval mode, writing the embeddings into an
  on-disk HDF5 array (the output of 1.2M cells × 128 floats would itself be 0.6 GB);
- ``reference-train``: does what scGPT's ``finetune_integration.py`` does — loads the
  whole matrix, bins a dense copy, tokenises every cell into dense ``(cells, 1201)``
  tensors (gene ids, values, masked values) up front — then trains the same steps. It is
  measured only up to ``--ref-factors`` (a few GiB); beyond, its data memory (RSS once
  the tensors exist) is extrapolated linearly and the training overhead measured at the
  largest measured size is added. The table says which figures are extrapolated.

"data GiB" columns: RSS once the data side is ready and before the model is built (for
streaming: file opened, batch labels read; for the reference: all token tensors built).

Goal (issue 7): the streaming peak at every size within 1.2× of its 1× peak.

    python benchmarks/bench_memory.py                 # ~6-8 min on 2 cores, cache ~6 GB
    python benchmarks/bench_memory.py --factors 1,10 --ref-factors 1 --steps 1   # quick

Writes ``bench_out/memory.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("CELLTUNE_SHARED", ROOT.parent / "shared"))
DONORS = SHARED / "data/integration/kang2018_pbmc_ctrl_8donors_muscat_12261cells.h5ad"
SMALL = SHARED / "data/integration/kang2018_pbmc_ifnb_ctrl_stim_muscat_1556cells.h5ad"
SOURCES = {"donors": (DONORS, "batch"), "stim": (SMALL, "sample_id")}
N_HVG = 1200
MAX_SEQ_LEN = N_HVG + 1


def rss_gib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------- shared bits
def build_model(n_genes: int, n_batches: int, dropout: float = 0.2) -> Any:
    """The integration configuration of SPEC §4 (as ``celltune integrate`` builds it)."""
    from celltune.model import CellTransformer, ModelConfig

    conf = ModelConfig(
        ntoken=n_genes + 3,
        d_model=128,
        nhead=4,
        d_hid=128,
        nlayers=4,
        dropout=dropout,
        pad_id=n_genes + 1,
        pad_value=-2,
        do_mvc=True,
        do_dab=True,
        use_batch_labels=True,
        num_batch_labels=n_batches,
        domain_spec_batchnorm=True,
        explicit_zero_prob=True,
        ecs_threshold=0.8,
    )
    return CellTransformer(conf)


def integration_step(model: Any, objective: Any, batch: dict[str, Any]) -> Any:
    """Forward with every integration head; returns the total loss (SPEC §4)."""
    out = model(
        batch["gene_ids"],
        batch["values"],
        padding_mask=batch["padding_mask"],
        batch_labels=batch["batch_labels"],
        MVC=True,
        ECS=False,
    )
    mask = batch["values"].eq(-1.0) & ~batch["padding_mask"]
    loss, _ = objective(out, batch, mask)
    return loss


def collator(n_genes: int, mask_ratio: float = 0.4, seed: int = 0) -> Any:
    import numpy as np

    from celltune.data.dataset import TokenCollator

    return TokenCollator(
        n_genes=n_genes,
        gene_ids=np.arange(n_genes, dtype=np.int64),
        cls_id=n_genes,
        pad_id=n_genes + 1,
        include_zero_gene=True,
        max_seq_len=MAX_SEQ_LEN,
        pad_value=-2,
        mask_ratio=mask_ratio,
        seed=seed,
    )


def select_hvgs(path: Path, batch_key: str, cache: Path) -> list[int]:
    """Column indices of the HVGs of the 1× file (celltune's SPEC §1 pipeline), cached."""
    out = cache / f"hvg_{path.stem}.json"
    if out.is_file():
        return json.loads(out.read_text())
    import anndata
    import numpy as np

    from celltune.data.preprocess import preprocess
    from celltune.files import write_json_atomic

    ad = anndata.read_h5ad(path)
    pp = preprocess(ad, n_hvg=min(N_HVG, ad.n_vars - 1), batch_key=batch_key, quiet=True)
    cols = np.flatnonzero(ad.var_names.isin(pp.var_names)).tolist()
    write_json_atomic(out, cols)
    return cols


def replicated_file(src: Path, factor: int, cache: Path) -> tuple[Path, float]:
    """The cached ``factor``× copy of ``src`` (written once); returns (path, write seconds)."""
    from celltune.data.streaming import replicate_h5ad

    path = cache / f"{src.stem}_x{factor}.h5ad"
    if path.is_file():
        return path, 0.0
    t0 = time.perf_counter()
    replicate_h5ad(src, path, factor, compression=None)
    return path, time.perf_counter() - t0


# ----------------------------------------------------------------------------- workers
def worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from celltune.losses import IntegrationObjective

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cols = np.asarray(json.loads(Path(args.hvg_file).read_text()), dtype=np.int64)
    n_genes = cols.size
    rss_start = rss_gib()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"mode": args.mode, "factor": args.factor}

    if args.mode.startswith("stream"):
        from celltune.data.streaming import StreamingCellDataset

        train = args.mode == "stream-train"
        ds = StreamingCellDataset(
            args.path,
            np.arange(n_genes),
            var_subset=cols,
            batch_key=args.batch_key,
            batch_size=args.batch_size if train else args.embed_batch_size,
            shuffle=train,
            group_by_batch=train,
            drop_last=train,  # full mini-batches only: activation memory is then equal
            chunk_size=args.chunk_size,
            buffer_chunks=args.buffer_chunks,
        )
        n_batches = len(ds.batch_categories)
        n_cells = ds.n_rows
        loader = ds.loader(collator(n_genes, 0.4 if train else 0.0), num_workers=args.workers)
    else:  # the scGPT reference approach: everything dense and tokenised up front
        import anndata
        import scipy.sparse as sp

        from celltune.data.binning import bin_matrix

        ad = anndata.read_h5ad(args.path)
        n_cells = ad.n_obs
        codes = ad.obs[args.batch_key].cat.codes.to_numpy().astype(np.int64)
        n_batches = int(codes.max()) + 1
        dense = np.asarray(sp.csr_matrix(ad.X)[:, cols].toarray(), dtype=np.float32)  # .A
        del ad
        binned = bin_matrix(dense, 51, 0)  # dense in → dense out, as scGPT's X_binned
        genes = torch.cat(  # tokenize_and_pad_batch(include_zero_gene=True, append_cls)
            [torch.full((n_cells, 1), n_genes), torch.arange(n_genes).expand(n_cells, -1)], 1
        ).contiguous()
        values = torch.cat([torch.zeros(n_cells, 1), torch.from_numpy(binned)], 1)
        del binned
        masked = values.clone()  # random_mask_value(mask_ratio=0.4)
        masked[torch.rand(masked.shape) < 0.4] = -1.0
        masked[:, 0] = 0.0
        labels = torch.from_numpy(codes)

        def ref_batches() -> Any:
            perm = torch.randperm(n_cells)
            for i in range(0, n_cells, args.batch_size):
                idx = perm[i : i + args.batch_size]
                yield {
                    "gene_ids": genes[idx],
                    "values": masked[idx],
                    "target_values": values[idx],
                    "padding_mask": torch.zeros(idx.numel(), MAX_SEQ_LEN, dtype=torch.bool),
                    "batch_labels": labels[idx],
                }

        loader = ref_batches()
        result["token_tensors_gib"] = (
            genes.nbytes + values.nbytes + masked.nbytes + dense.nbytes
        ) / 2**30
    result["rss_after_data_gib"] = rss_gib()
    model = build_model(n_genes, max(n_batches, 2))
    result["n_cells"] = int(n_cells)

    steps = 0
    t_steps = time.perf_counter()
    if args.mode in ("stream-train", "reference-train"):
        model.train()
        objective = IntegrationObjective()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        for batch in loader:
            loss = integration_step(model, objective, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            if steps >= args.steps:
                break
    else:  # stream-embed: embeddings go to an on-disk array, not to a cells × d matrix
        import h5py

        model.eval()
        out_path = Path(args.scratch) / f"emb_{os.getpid()}.h5"
        with h5py.File(out_path, "w") as fh, torch.no_grad():
            emb = fh.create_dataset("X_celltune", (n_cells, 128), dtype="f4", chunks=(1024, 128))
            for batch in loader:
                e = model.embed(
                    batch["gene_ids"],
                    batch["values"],
                    batch["padding_mask"],
                    batch_labels=batch["batch_labels"],
                )
                idx = batch["cell_index"].numpy()
                order = np.argsort(idx)
                emb[idx[order]] = e.numpy()[order]  # h5py wants increasing indices
                steps += 1
                if steps >= args.embed_steps:
                    break
        out_path.unlink()
    result.update(
        steps=steps,
        seconds_per_step=(time.perf_counter() - t_steps) / max(steps, 1),
        total_seconds=time.perf_counter() - t0,
        rss_start_gib=rss_start,
        peak_rss_gib=rss_gib(),
    )
    return result


def spawn(args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    """One measurement in a fresh interpreter, so each peak is its own."""
    cmd = [sys.executable, __file__, "--worker", "--threads", str(args.threads)]
    for key in ("batch_size", "steps", "embed_batch_size", "embed_steps", "chunk_size"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--buffer-chunks", str(args.buffer_chunks), "--workers", str(args.workers)]
    for key, value in kw.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:] or ["?"]
        return dict(kw, error=" | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` (one point: through the origin's slope)."""
    if len(points) == 1:
        x, y = points[0]
        return 0.0, y / x
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - b * mx, b


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--factors", default="1,10,50,100")
    p.add_argument("--ref-factors", default="1,2,5", help="reference sizes actually measured")
    p.add_argument("--source", choices=sorted(SOURCES), default="donors")
    p.add_argument("--cache-dir", default=str(ROOT / "bench_out" / "cache"))
    p.add_argument("--out", default=str(ROOT / "bench_out" / "memory.json"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="training steps per measurement")
    p.add_argument("--embed-batch-size", type=int, default=64)
    p.add_argument("--embed-steps", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--buffer-chunks", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (streaming)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-embed", action="store_true")
    # worker-only options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--factor", type=int, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--batch-key", help=argparse.SUPPRESS)
    p.add_argument("--hvg-file", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--from-json", help="only re-print the table of an earlier result")
    args = p.parse_args()
    if args.from_json:
        reprint(args.from_json)
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return

    t_all = time.perf_counter()
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    factors = sorted({int(f) for f in args.factors.split(",")})
    ref_factors = sorted({int(f) for f in args.ref_factors.split(",") if f})
    src, batch_key = SOURCES[args.source]
    need = src.stat().st_size * 4 * (sum(factors) + sum(ref_factors))  # gzip → raw ≈ 3.5×
    free = shutil.disk_usage(cache).free
    if need > 0.8 * free and args.source == "donors":
        print(f"only {free / 2**30:.1f} GiB free for ~{need / 2**30:.1f} GiB: using the small file")
        src, batch_key = SOURCES["stim"]
    select_hvgs(src, batch_key, cache)
    hvg_file = cache / f"hvg_{src.stem}.json"
    files: dict[int, dict[str, Any]] = {}
    for f in sorted(set(factors) | set(ref_factors)):
        path, secs = replicated_file(src, f, cache)
        files[f] = {"path": str(path), "bytes": path.stat().st_size, "write_s": round(secs, 1)}
        print(
            f"{f:>4}×: {path.name} {path.stat().st_size / 2**30:.2f} GiB (written in {secs:.0f}s)"
        )

    common = {"batch_key": batch_key, "hvg_file": hvg_file, "scratch": cache}
    runs: list[dict[str, Any]] = []
    modes = ["stream-train"] + ([] if args.skip_embed else ["stream-embed"])
    for mode in modes:
        for f in factors:
            r = spawn(args, mode=mode, factor=f, path=files[f]["path"], **common)
            runs.append(r)
            print(
                f"  {mode:<16}{f:>4}×  peak {r.get('peak_rss_gib', float('nan')):.2f} GiB"
                f"  {r.get('error', '')}"
            )
    for f in ref_factors:
        r = spawn(args, mode="reference-train", factor=f, path=files[f]["path"], **common)
        runs.append(r)
        print(
            f"  reference-train {f:>4}×  peak {r.get('peak_rss_gib', float('nan')):.2f} GiB"
            f"  {r.get('error', '')}"
        )

    rows, fit, ref_pts, goal = summarize(runs, files, factors, ref_factors)
    print()
    print(
        f"source: {src.name}; batch {args.batch_size}, {args.steps} train steps, "
        f"{args.embed_steps}×{args.embed_batch_size} embed, {MAX_SEQ_LEN} tokens, "
        f"{args.threads} threads; chunk {args.chunk_size} × buffer {args.buffer_chunks}"
    )
    print_table(rows, fit, ref_pts, goal)
    from celltune.files import write_json_atomic

    write_json_atomic(
        args.out,
        {
            "source": str(src),
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
            "factors": factors,
            "ref_factors": ref_factors,
            "files": files,
            "runs": runs,
            "table": rows,
            "reference_fit_gib": None if fit is None else {"a": fit[0], "b_per_factor": fit[1]},
            "goal_met": goal,
            "wall_s": time.perf_counter() - t_all,
        },
    )
    print(f"wrote {args.out} ({time.perf_counter() - t_all:.0f} s)")


def summarize(
    runs: list[dict[str, Any]],
    files: dict[Any, dict[str, Any]],
    factors: list[int],
    ref_factors: list[int],
) -> tuple[list[dict[str, Any]], tuple[float, float] | None, list[Any], bool]:
    """One row per size: peaks, ratios to 1×, data-only memory, reference (fit beyond)."""

    def get(mode: str, f: int, key: str = "peak_rss_gib") -> float | None:
        for r in runs:
            if r.get("mode") == mode and r.get("factor") == f and key in r:
                return float(r[key])
        return None

    n1 = next((r["n_cells"] for r in runs if r.get("factor") == 1 and "n_cells" in r), None)
    ref_pts = [(float(f), get("reference-train", f)) for f in ref_factors]
    ref_pts = [(f, v) for f, v in ref_pts if v is not None]
    data_pts = [(float(f), get("reference-train", f, "rss_after_data_gib")) for f in ref_factors]
    data_fit = linear_fit([(f, v) for f, v in data_pts if v is not None]) if ref_pts else None
    overhead = None
    if ref_pts:
        f_max = int(max(f for f, _ in ref_pts))
        top_data = get("reference-train", f_max, "rss_after_data_gib")
        top_peak = get("reference-train", f_max)
        if top_data is not None and top_peak is not None:
            overhead = top_peak - top_data
    fit = None if data_fit is None or overhead is None else (data_fit[0] + overhead, data_fit[1])
    rows = []
    base_train, base_embed = get("stream-train", 1), get("stream-embed", 1)
    for f in sorted(set(factors) | set(ref_factors)):
        st, se = get("stream-train", f), get("stream-embed", f)
        ref = get("reference-train", f)
        ref_data = get("reference-train", f, "rss_after_data_gib")
        ref_kind = "measured"
        if ref is None and overhead is not None and data_fit is not None:
            # data memory grows linearly with cells; training adds a fixed overhead
            # (activations, optimizer), taken at the largest measured size
            ref_data = data_fit[0] + data_fit[1] * f
            ref, ref_kind = ref_data + overhead, "extrapolated"
        rows.append(
            {
                "factor": f,
                "cells": None if n1 is None else n1 * f,
                "file_gib": files[f]["bytes"] / 2**30 if f in files else None,
                "stream_train_gib": st,
                "stream_train_vs_1x": None if st is None or not base_train else st / base_train,
                "stream_embed_gib": se,
                "stream_embed_vs_1x": None if se is None or not base_embed else se / base_embed,
                "stream_data_gib": get("stream-train", f, "rss_after_data_gib"),
                "reference_train_gib": ref,
                "reference_data_gib": ref_data,
                "reference_kind": ref_kind if ref is not None else None,
            }
        )
    goal = all(
        r["stream_train_vs_1x"] is None or r["stream_train_vs_1x"] <= 1.2 for r in rows
    ) and all(r["stream_embed_vs_1x"] is None or r["stream_embed_vs_1x"] <= 1.2 for r in rows)
    return rows, fit, ref_pts, goal


def print_table(rows: list[dict[str, Any]], fit: Any, ref_pts: list[Any], goal: bool) -> None:
    """Markdown table; "data" = RSS once the data are ready, before the model exists."""

    def fmt(v: float | None, spec: str = ".2f") -> str:
        return "—" if v is None else format(v, spec)

    print(
        "| × | cells | file GiB | stream train peak GiB (vs 1×) | stream embed peak GiB "
        "(vs 1×) | stream data GiB | reference train peak GiB | reference data GiB |"
    )
    print("|" + "---|" * 8)
    for r in rows:
        extra = " (extrapolated)" if r["reference_kind"] == "extrapolated" else ""
        print(
            f"| {r['factor']} | {fmt(r['cells'], ',')} | {fmt(r['file_gib'])} "
            f"| {fmt(r['stream_train_gib'])} ({fmt(r['stream_train_vs_1x'])}) "
            f"| {fmt(r['stream_embed_gib'])} ({fmt(r['stream_embed_vs_1x'])}) "
            f"| {fmt(r['stream_data_gib'])} "
            f"| {fmt(r['reference_train_gib'])}{extra} | {fmt(r['reference_data_gib'])}{extra} |"
        )
    print()
    print(f"goal (streaming peak within 1.2× of 1×): {'met' if goal else 'NOT met'}")
    if fit is not None:
        print(
            f"reference extrapolation: {fit[0]:.2f} GiB + {fit[1]:.3f} GiB per × of the source "
            "(data memory fitted linearly, plus the training overhead at the largest measured "
            f"size; measured at {', '.join(f'{int(x)}×' for x, _ in ref_pts)})"
        )


def reprint(path: str) -> None:
    """Print the table of an existing JSON result again (e.g. with a newer table format)."""
    d = json.loads(Path(path).read_text())
    files = {int(k): v for k, v in d["files"].items()}
    factors = d.get("factors") or sorted(
        {r["factor"] for r in d["runs"] if r.get("mode", "").startswith("stream")}
    )
    ref_factors = d.get("ref_factors") or sorted(
        {r["factor"] for r in d["runs"] if r.get("mode") == "reference-train"}
    )
    rows, fit, ref_pts, goal = summarize(d["runs"], files, factors, ref_factors)
    print_table(rows, fit, ref_pts, goal)


if __name__ == "__main__":
    main()
