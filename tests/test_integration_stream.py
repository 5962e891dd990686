"""`--stream` (training and embedding straight from the .h5ad on disk) and `--devices N`
(DDP through torchrun) on the real Kang 2018 ctrl/stim PBMC file (issue 7).

The streamed path must give a cell exactly the tokens and the embedding the in-memory
path gives it, choose the same HVGs and split when its HVG sample covers the file, and
write the same files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from celltune.cli.launch import strip_option, torchrun_command
from celltune.data.io import read_h5ad
from celltune.data.preprocess import preprocess
from celltune.errors import InputError
from celltune.tasks.config import load_config
from celltune.tasks.integration import (
    EMBEDDING_KEY,
    IntegrationConfig,
    embed,
    embed_file,
    integrate_file,
    preprocess_config,
    stratified_split,
)

TINY = {
    "data.batch_key": "batch",
    "data.label_key": "cell_type",
    "data.n_hvg": 100,
    "data.chunk_size": 128,
    "data.buffer_chunks": 2,
    "model.d_model": 32,
    "model.d_hid": 32,
    "model.nlayers": 2,
    "train.batch_size": 32,
    "train.epochs": 1,
    "train.quiet": True,
}


def _cfg(**extra: object) -> IntegrationConfig:
    return load_config(None, {**TINY, **extra}, schema=IntegrationConfig)


def test_embed_file_equals_in_memory_embed(kang_stim_path: Path, fixtures_dir: Path, tmp_path):
    """Zero-shot embedding of a published-format model: streamed == in memory, any chunk."""
    model_dir = fixtures_dir / "fixture_integration"
    mem = embed(read_h5ad(kang_stim_path), model_dir, batch_key="batch", quiet=True)
    out = embed_file(
        kang_stim_path, model_dir, tmp_path / "emb.h5ad", batch_key="batch", batch_size=50,
        chunk_size=97, quiet=True,
    )  # fmt: skip
    ad = anndata.read_h5ad(out)
    assert ad.X is None and ad.n_obs == mem.n_obs  # obs + embedding only; X stays on disk
    assert list(ad.obs_names) == list(mem.obs_names)
    assert list(ad.obs.columns) == list(mem.obs.columns)
    np.testing.assert_allclose(ad.obsm[EMBEDDING_KEY], mem.obsm[EMBEDDING_KEY], atol=1e-5)
    assert ad.uns["celltune"]["embed"]["stream"]


def test_stream_errors_name_the_fix(kang_stim_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"'donor_id'.*available obs columns"):
        integrate_file(kang_stim_path, _cfg(**{"data.batch_key": "donor_id"}))
    with pytest.raises(InputError, match=r"'celltype'.*--label-key"):
        integrate_file(kang_stim_path, _cfg(**{"data.label_key": "celltype"}))
    with pytest.raises(InputError, match="stream-sample-cells"):
        integrate_file(kang_stim_path, _cfg(**{"data.stream_sample_cells": 10}))
    ctrl = read_h5ad(kang_stim_path)
    ctrl = ctrl[ctrl.obs["batch"] == "ctrl"].copy()
    ctrl.write_h5ad(tmp_path / "ctrl.h5ad")
    with pytest.raises(InputError, match="single batch"):
        integrate_file(tmp_path / "ctrl.h5ad", _cfg())


def test_devices_relaunch_command() -> None:
    argv = ["integrate", "a.h5ad", "--devices", "2", "--out", "r", "--devices=3"]
    assert strip_option(argv, "--devices") == ["integrate", "a.h5ad", "--out", "r"]
    cmd = torchrun_command(2, argv)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert cmd[6:] == ["celltune", "integrate", "a.h5ad", "--out", "r"]


@pytest.mark.e2e
def test_stream_integrate_matches_the_in_memory_path(
    kang_stim_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CLI --stream end to end; same HVGs and split as in memory; embed reproduces it."""
    from celltune.cli.main import main

    out = tmp_path / "run"
    flags = [
        "integrate", str(kang_stim_path), "--batch-key", "batch", "--label-key", "cell_type",
        "--out", str(out), "--epochs", "1", "--batch-size", "32", "--n-hvg", "100",
        "--baselines", "pca", "--quiet", "--stream", "--chunk-size", "128",
        "--buffer-chunks", "2", "--set", "model.d_model=32", "--set", "model.d_hid=32",
        "--set", "model.nlayers=2",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main(flags)
    assert done.value.code == 0
    assert "celltune" in capsys.readouterr().out

    kang = read_h5ad(kang_stim_path)
    ad = anndata.read_h5ad(out / "integrated.h5ad")
    assert ad.X is None and ad.n_obs == kang.n_obs and list(ad.obs_names) == list(kang.obs_names)
    emb = ad.obsm[EMBEDDING_KEY]
    assert emb.shape == (kang.n_obs, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not (out / "embedding.npy").exists()  # the on-disk scratch array is removed

    # The HVG sample covers the file (1,556 < 50,000 cells): the in-memory HVGs and split.
    cfg = load_config(out / "config.yaml", schema=IntegrationConfig)
    assert cfg.data.stream
    pp = preprocess(kang, preprocess_config(cfg, 2, kang.n_vars))
    assert set(ad.var_names[ad.var["celltune_hvg"]]) == set(pp.var_names)
    _, val_idx = stratified_split(kang.obs["batch"], 0.1, seed=0)
    assert np.array_equal(np.flatnonzero(ad.obs["celltune_split"] == "valid"), val_idx)

    # The model directory reproduces the streamed embedding in memory (same tokens).
    again = embed(kang, out / "model", batch_key="batch", batch_size=64, quiet=True)
    np.testing.assert_allclose(again.obsm[EMBEDDING_KEY], emb, atol=1e-5)

    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [1]
    assert np.isfinite(hist[["train/mse", "val/mse", "train/dab", "val/ecs"]]).all().all()
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("celltune", "pca"):
        for col in ("avg_bio", "avg_batch", "nmi", "ilisi"):
            value = metrics[method][col]
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (method, col, value)
    assert (out / "report.html").is_file() and (out / "umap_batch.png").is_file()


@pytest.mark.e2e
def test_stream_subsample_resume(kang_stim_path: Path, tmp_path: Path) -> None:
    """A row subset (data.max_cells) streams, resumes, and maps embeddings to its cells."""
    out = tmp_path / "sub"
    cfg = _cfg(**{"data.max_cells": 300, "data.stream": True})
    first = integrate_file(kang_stim_path, cfg, out)
    assert len(first.history) == 1
    with pytest.raises(InputError, match="--resume"):
        integrate_file(kang_stim_path, cfg, out)
    res = integrate_file(kang_stim_path, _cfg(**{**cfg_overrides(cfg), "train.epochs": 2}),
                         out, resume=True)  # fmt: skip
    assert res.history["epoch"].tolist() == [1, 2]
    assert 280 <= res.adata.n_obs <= 320
    kang = read_h5ad(kang_stim_path)
    again = embed(kang[res.adata.obs_names].copy(), out / "model", batch_key="batch", quiet=True)
    np.testing.assert_allclose(again.obsm[EMBEDDING_KEY], res.adata.obsm[EMBEDDING_KEY], atol=1e-5)
    # processed = the evaluation sample: normalised HVG data with the embedding attached
    assert res.processed.n_obs == res.adata.n_obs and res.processed.n_vars == 100
    assert {"counts", "X_normed", "X_binned"} <= set(res.processed.layers)


def cfg_overrides(cfg: IntegrationConfig) -> dict[str, object]:
    return {"data.max_cells": cfg.data.max_cells, "data.stream": True}


@pytest.mark.e2e
def test_devices_two_processes_write_one_run(kang_stim_path: Path, tmp_path: Path) -> None:
    """`--devices 2` starts torchrun; 2 gloo ranks train; rank 0 alone writes the run."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "celltune", "integrate", str(kang_stim_path),
        "--batch-key", "batch", "--out", str(out), "--epochs", "1", "--batch-size", "16",
        "--n-hvg", "50", "--baselines", "none", "--quiet", "--devices", "2",
        "--set", "data.max_cells=200", "--set", "model.d_model=16", "--set", "model.d_hid=16",
        "--set", "model.nlayers=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting 2 processes" in proc.stderr
    assert proc.stdout.count("wrote") == 1  # rank 0 alone reports
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [1] and np.isfinite(hist["val/mse"]).all()
    ad = anndata.read_h5ad(out / "integrated.h5ad")
    assert ad.obsm[EMBEDDING_KEY].shape[1] == 16 and 180 <= ad.n_obs <= 220
    assert (out / "model" / "best_model.pt").is_file()


@pytest.mark.e2e
def test_stream_reads_counts_from_a_layer(kang_stim_path: Path, tmp_path: Path) -> None:
    """`--layer counts` streams the raw counts of a layer while X holds log data."""
    import scanpy as sc

    kang = read_h5ad(kang_stim_path)
    kang = kang[np.sort(np.random.default_rng(0).choice(kang.n_obs, 400, replace=False))].copy()
    kang.layers["counts"] = kang.X.copy()
    sc.pp.normalize_total(kang, target_sum=1e4)
    sc.pp.log1p(kang)
    kang.write_h5ad(tmp_path / "layered.h5ad")
    res = integrate_file(tmp_path / "layered.h5ad", _cfg(**{"data.layer": "counts"}))
    assert res.adata.n_obs == 400 and np.isfinite(res.adata.obsm[EMBEDDING_KEY]).all()
    assert "counts" in res.processed.layers
    with pytest.raises(InputError, match="log-transformed"):
        integrate_file(tmp_path / "layered.h5ad", _cfg())  # X itself is log data
