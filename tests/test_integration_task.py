"""Batch-integration task (issue 4) on the real Kang 2018 ctrl/stim PBMC data.

Fast tests cover input checks, the validation split and zero-shot embedding from the scGPT
reference fixture; the e2e test fine-tunes a tiny model for 1 + 1 epochs (interrupted and
resumed) through the CLI and checks every output file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from celltune.data.io import read_h5ad
from celltune.errors import InputError
from celltune.tasks.config import apply_overrides, load_config
from celltune.tasks.integration import (
    EMBEDDING_KEY,
    IntegrationConfig,
    check_integration_input,
    embed,
    integrate,
    stratified_split,
)

# A CI-sized run: ~300 cells, 100 HVGs, a 2-layer 32-dim model.
TINY = {
    "data.batch_key": "batch",
    "data.label_key": "cell_type",
    "data.max_cells": 300,
    "data.n_hvg": 100,
    "model.d_model": 32,
    "model.d_hid": 32,
    "model.nlayers": 2,
    "train.batch_size": 32,
    "train.quiet": True,
}


@pytest.fixture(scope="module")
def kang(kang_stim_path: Path) -> anndata.AnnData:
    return read_h5ad(kang_stim_path)


def _cfg(**extra: object) -> IntegrationConfig:
    return load_config(None, {**TINY, **extra}, schema=IntegrationConfig)


# ----------------------------------------------------------------------------- bad input
def test_missing_batch_or_label_column_lists_the_columns(kang: anndata.AnnData) -> None:
    with pytest.raises(InputError, match=r"'donnor'.*cell_type"):
        check_integration_input(kang, _cfg(**{"data.batch_key": "donnor"}))
    with pytest.raises(InputError, match=r"'celltype'.*--label-key"):
        check_integration_input(kang, _cfg(**{"data.label_key": "celltype"}))
    with pytest.raises(InputError, match="--batch-key"):
        integrate(kang, _cfg(**{"data.batch_key": None}))


def test_single_batch_needs_no_dab_no_dsbn(
    kang: anndata.AnnData, caplog: pytest.LogCaptureFixture
) -> None:
    ctrl = kang[kang.obs["batch"] == "ctrl"].copy()
    with pytest.raises(InputError, match=r"single batch.*--no-dab --no-dsbn"):
        check_integration_input(ctrl, _cfg())
    with pytest.raises(InputError, match="single batch"):
        check_integration_input(ctrl, _cfg(**{"model.dsbn": False}))  # DAB still on
    with caplog.at_level(logging.WARNING, logger="celltune.tasks.integration"):
        cats = check_integration_input(ctrl, _cfg(**{"model.dab": False, "model.dsbn": False}))
    assert cats == ["ctrl"]
    assert "without DAB/DSBN" in caplog.text


def test_tiny_batches_warn(kang: anndata.AnnData, caplog: pytest.LogCaptureFixture) -> None:
    stim = np.flatnonzero(kang.obs["batch"] == "stim")[:5]
    ctrl = np.flatnonzero(kang.obs["batch"] == "ctrl")[:200]
    small = kang[np.sort(np.concatenate([stim, ctrl]))].copy()
    with caplog.at_level(logging.WARNING, logger="celltune.tasks.integration"):
        assert check_integration_input(small, _cfg()) == ["ctrl", "stim"]
    assert "fewer than 20 cells: stim (5)" in caplog.text


def test_genes_outside_the_pretrained_vocabulary(kang: anndata.AnnData, fixtures_dir: Path) -> None:
    renamed = kang[::15].copy()  # both batches
    renamed.var_names = [f"NOT_A_GENE_{i}" for i in range(renamed.n_vars)]
    cfg = _cfg(**{"model.pretrained": str(fixtures_dir / "fixture_integration")})
    with pytest.raises(InputError, match=r"none of the 1,267 genes matched the vocabulary"):
        integrate(renamed, cfg)


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_a_checkpoint(
    kang: anndata.AnnData, tmp_path: Path
) -> None:
    from celltune.tasks.config import dump_config

    out = tmp_path / "run"
    out.mkdir()
    dump_config(_cfg(), out / "config.yaml")
    (out / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(InputError, match="--resume"):
        integrate(kang, _cfg(), out)
    with pytest.raises(InputError, match=r"differ.*model.d_model"):
        integrate(kang, _cfg(**{"model.d_model": 64}), out, resume=True)


def test_stratified_split_is_seeded_and_per_batch() -> None:
    batches = np.array(["a"] * 100 + ["b"] * 31 + ["c"] * 1)
    tr, va = stratified_split(batches, 0.1, seed=3)
    tr2, va2 = stratified_split(batches, 0.1, seed=3)
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    assert not set(tr) & set(va) and len(tr) + len(va) == batches.size
    held = pd.Series(batches[va]).value_counts()
    assert held["a"] == 10 and held["b"] == 3 and "c" not in held
    assert not np.array_equal(stratified_split(batches, 0.1, seed=4)[1], va)


# ----------------------------------------------------------------------------- embed
def test_embed_from_scgpt_fixture_is_chunk_invariant(
    kang: anndata.AnnData, fixtures_dir: Path
) -> None:
    model_dir = fixtures_dir / "fixture_integration"
    sub = kang[:120].copy()
    a = embed(sub, model_dir, batch_key="batch", batch_size=7, quiet=True)
    b = embed(sub, model_dir, batch_key="batch", batch_size=64, quiet=True)
    ea, eb = a.obsm[EMBEDDING_KEY], b.obsm[EMBEDDING_KEY]
    assert ea.shape == (120, 32) and ea.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ea, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ea, eb, atol=1e-5)
    assert a.n_vars == kang.n_vars and EMBEDDING_KEY not in kang.obsm  # a copy, input intact
    info = a.uns["celltune"]["embed"]
    assert 0 < info["n_genes_matched"] < kang.n_vars and info["zero_shot_tokenisation"]
    # Different cells get different embeddings (the model sees their expression).
    assert np.abs(ea[0] - ea[1]).max() > 1e-3
    # Without a batch key the model falls back to pooled DSBN statistics (still finite).
    c = embed(sub, model_dir, batch_size=64, quiet=True)
    assert np.isfinite(c.obsm[EMBEDDING_KEY]).all()


def test_embed_bad_input(kang: anndata.AnnData, fixtures_dir: Path, tmp_path: Path) -> None:
    model_dir = fixtures_dir / "fixture_integration"
    with pytest.raises(InputError, match="not found; available obs columns"):
        embed(kang[:20].copy(), model_dir, batch_key="nope", quiet=True)
    with pytest.raises(InputError, match="batch-size"):
        embed(kang[:20].copy(), model_dir, batch_size=0, quiet=True)
    from celltune.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        embed(kang[:20].copy(), tmp_path / "no_model", quiet=True)


# ----------------------------------------------------------------------------- e2e
@pytest.mark.e2e
def test_integrate_end_to_end_with_resume(
    kang_stim_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from celltune.cli.main import main
    from celltune.eval.integration import METRIC_COLUMNS
    from celltune.model.checkpoint import load_model

    out = tmp_path / "run"
    # 1) A first run that stops after one epoch (as an interrupted run would leave it).
    first = integrate(read_h5ad(kang_stim_path), _cfg(**{"train.epochs": 1}), out)
    assert len(first.history) == 1
    h1 = pd.read_csv(out / "history.csv")

    # 2) The CLI resumes it to 2 epochs and evaluates against PCA and Harmony.
    flags = [
        "integrate", str(kang_stim_path), "--batch-key", "batch", "--label-key", "cell_type",
        "--out", str(out), "--epochs", "2", "--batch-size", "32", "--n-hvg", "100",
        "--baselines", "pca,harmony", "--quiet", "--resume",
        "--set", "data.max_cells=300", "--set", "model.d_model=32",
        "--set", "model.d_hid=32", "--set", "model.nlayers=2",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main(flags)
    assert done.value.code == 0
    assert "celltune" in capsys.readouterr().out

    # history: both epochs, epoch 1 carried over unchanged, every term train + validation
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [1, 2]
    pd.testing.assert_series_equal(hist.loc[0, h1.columns], h1.loc[0], check_names=False)
    for term in ("mse", "zero_log_prob", "gepc", "gepc_zero_log_prob", "ecs", "dab"):
        for split in ("train", "val"):
            assert np.isfinite(hist[f"{split}/{term}"]).all(), f"{split}/{term}"
    # the per-epoch embedding health of the validation sample (issue 16's guardrail)
    assert (hist["val/pr"] >= 1).all() and hist["val/mixing"].between(0, 1).all()
    assert hist["val/preserve"].between(0, 1).all()

    # integrated.h5ad: every cell embedded, unit rows, split recorded, baselines alongside
    ad = anndata.read_h5ad(out / "integrated.h5ad")
    emb = ad.obsm[EMBEDDING_KEY]
    assert emb.shape == (ad.n_obs, 32) and 280 <= ad.n_obs <= 320
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert set(ad.obs["celltune_split"]) == {"train", "valid"}
    assert (ad.obs["celltune_split"] == "valid").mean() == pytest.approx(0.1, abs=0.02)
    assert "X_pca" in ad.obsm and "X_harmony" in ad.obsm
    assert ad.var["celltune_hvg"].sum() == 100

    # model/: scGPT format, reloadable, and `embed` reproduces the run's embedding
    model_dir = out / "model"
    for name in ("args.json", "vocab.json", "best_model.pt", "celltune_task.json"):
        assert (model_dir / name).is_file()
    assert load_model(model_dir).config.num_batch_labels == 2
    again = embed(ad, model_dir, batch_key="batch", batch_size=50, quiet=True)
    np.testing.assert_allclose(again.obsm[EMBEDDING_KEY], emb, atol=1e-5)

    # metrics.json: the four methods; those run have every metric, finite and in [0, 1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"celltune", "pca", "harmony", "scvi"}
    assert "not requested" in metrics["scvi"]["skipped"]
    for method in ("celltune", "pca", "harmony"):
        for col in METRIC_COLUMNS:
            value = metrics[method][col]
            assert value is not None and math.isfinite(value), (method, col)
            assert 0.0 <= value <= 1.0, (method, col, value)
        row = metrics[method]
        assert row["avg_bio"] == pytest.approx(
            np.mean([row["nmi"], row["ari"], row["asw_celltype"]])
        )
        assert row["avg_batch"] == pytest.approx(
            np.mean([row["asw_batch"], row["graph_connectivity"]])
        )

    # config.yaml: the full resolved configuration, including the CLI flags
    cfg = load_config(out / "config.yaml", schema=IntegrationConfig)
    assert cfg.data.max_cells == 300 and cfg.model.d_model == 32 and cfg.train.epochs == 2
    assert apply_overrides(cfg, {"train.epochs": 2}).eval.baselines  # loadable & usable

    # plots and report
    for png in ("umap_batch.png", "umap_celltype.png", "metrics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.html").read_text()
    assert "scIB metrics" in report and "harmony" in report and "data:image/png;base64" in report

    # Re-running without --resume must not silently overwrite the finished run.
    with pytest.raises(SystemExit) as err:
        main([f for f in flags if f != "--resume"])
    assert err.value.code == 2
    assert "--resume" in capsys.readouterr().err
