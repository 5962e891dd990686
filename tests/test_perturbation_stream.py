"""``perturb train --stream``: rows read per mini-batch from the file give the same model."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from celltune.cli.main import app
from celltune.data.gears import prepare_perturbation_data, write_prepared
from celltune.data.source import StoreSource
from celltune.errors import InputError
from celltune.tasks.perturbation import (
    PerturbConfig,
    load_run,
    predict_perturbations,
    train_perturbation_model,
)
from celltune.tasks.perturbation.pairing import PerturbationPairs
from celltune.tasks.perturbation.stream import StreamedRows, rows_mean


def _tiny(stream: bool, **train: object) -> PerturbConfig:
    cfg = PerturbConfig()
    cfg.model.d_model = cfg.model.d_hid = 32
    cfg.model.nhead = 2
    cfg.model.nlayers = 1
    cfg.data.n_eval_ctrl = 40
    cfg.data.control_pool = 60
    cfg.data.stream = stream
    cfg.data.stream_chunk_rows = 16
    cfg.train = cfg.train.replace(
        **{"epochs": 2, "batch_size": 32, "quiet": True, "device": "cpu", **train}
    )
    return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, adamson_mini_path: Path) -> Path:
    root = tmp_path_factory.mktemp("pstream")
    adata = ad.read_h5ad(adamson_mini_path)
    prep = prepare_perturbation_data(adata, data_is_raw=False, split="simulation", seed=1)
    return write_prepared(prep, root / "data.h5ad")


def test_streamed_rows_equal_in_memory_rows(prepared: Path) -> None:
    adata = ad.read_h5ad(prepared)
    take = np.array([5, 0, 7, 3])
    zeros = sp.csr_matrix((adata.n_obs, 2), dtype=np.float32)
    mem = sp.hstack([adata.X[:, take].astype(np.float32), zeros]).tocsr()
    rows = StreamedRows(StoreSource(prepared), take, n_extra=2, chunk_rows=7)
    assert rows.shape == mem.shape
    for r in ([3], [10, 2, 2, 300], np.arange(0, 320, 3)):
        np.testing.assert_array_equal(rows[r].toarray(), mem[r].toarray())
    sel = np.arange(1, 320, 2)
    np.testing.assert_array_equal(rows_mean(rows, sel, 50), rows_mean(mem, sel, 50))


def test_batch_reads_equal_item_reads(prepared: Path) -> None:
    adata = ad.read_h5ad(prepared)
    ctrl = np.flatnonzero(adata.obs["condition"].astype(str).to_numpy() == "ctrl")
    target = np.arange(0, 320, 5)
    kw = {
        "target_idx": target,
        "pert_cols": [np.array([1]) if i % 2 else np.array([], np.int64) for i in target],
        "control_idx": ctrl,
        "keys": np.arange(320),
        "seed": 3,
    }
    mem = PerturbationPairs(adata.X, **kw)
    st = PerturbationPairs(StreamedRows(StoreSource(prepared), np.arange(adata.n_vars)), **kw)
    batch = st.__getitems__(list(range(0, len(target), 3)))
    for i, it in zip(range(0, len(target), 3), batch, strict=True):
        one = mem[i]
        assert it.index == one.index and it.key == one.key
        np.testing.assert_array_equal(it.control, one.control)
        np.testing.assert_array_equal(it.target, one.target)


@pytest.mark.e2e
def test_streamed_training_gives_the_same_model(prepared: Path, tmp_path: Path) -> None:
    """Same seed, same data: identical batches, so identical weights, history, predictions."""
    mem = train_perturbation_model(prepared, tmp_path / "mem", _tiny(False))
    st = train_perturbation_model(prepared, tmp_path / "st", _tiny(True))
    a, b = mem.model.state_dict(), st.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = pd.read_csv(tmp_path / "mem" / "history.csv").drop(columns=["time_s"], errors="ignore")
    hb = pd.read_csv(tmp_path / "st" / "history.csv").drop(columns=["time_s"], errors="ignore")
    ha = ha[[c for c in ha.columns if "time" not in c and "second" not in c]]
    pd.testing.assert_frame_equal(ha, hb[ha.columns])
    ca = ad.read_h5ad(tmp_path / "mem" / "controls.h5ad")
    cb = ad.read_h5ad(tmp_path / "st" / "controls.h5ad")
    assert (ca.obs_names == cb.obs_names).all()
    np.testing.assert_array_equal(ca.X.toarray(), cb.X.toarray())
    with h5py.File(tmp_path / "mem" / "controls.h5ad") as f:  # written compressed
        assert f["X/data"].compression == "gzip"
    pa = predict_perturbations(tmp_path / "mem", ["HSPA5", "HSPA5+SEC61A1"], n_ctrl=30)
    pb = predict_perturbations(tmp_path / "st", ["HSPA5", "HSPA5+SEC61A1"], n_ctrl=30)
    pd.testing.assert_frame_equal(pa.mean, pb.mean, check_exact=True)
    ia = json.loads((tmp_path / "mem" / "run.json").read_text())
    ib = json.loads((tmp_path / "st" / "run.json").read_text())
    assert ia["best_val_pearson_delta"] == ib["best_val_pearson_delta"]
    assert ia["n_train_cells"] == ib["n_train_cells"]
    assert load_run(tmp_path / "st").model is not None


def test_stream_refuses_a_file_without_de_genes(prepared: Path, tmp_path: Path) -> None:
    adata = ad.read_h5ad(prepared)
    adata.uns = {}
    adata.write_h5ad(tmp_path / "no_de.h5ad")
    with pytest.raises(InputError, match="DE genes"):
        train_perturbation_model(tmp_path / "no_de.h5ad", tmp_path / "r", _tiny(True))


def test_cli_train_stream(prepared: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["perturb", "train", "--help"])
    assert "--stream" in res.output and "perturb train big.h5ad" in res.output
    args = ["perturb", "train", str(prepared), "--out", str(tmp_path / "r"), "--stream"]
    args += ["--epochs", "1", "--quiet", "--device", "cpu", "--set", "model.nlayers=1"]
    args += ["--set", "model.d_model=32", "--set", "model.d_hid=32", "--set", "model.nhead=2"]
    args += ["--set", "train.max_steps_per_epoch=2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = (tmp_path / "r" / "config.yaml").read_text()
    assert "stream: true" in cfg
