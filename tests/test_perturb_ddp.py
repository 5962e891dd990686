"""``perturb train`` under torchrun (issue 15): two gloo ranks with a per-rank batch of B
train the same weights as one process with a batch of 2B, and rank 0 alone writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import pytest
import torch

from celltune.tasks.perturbation import PerturbConfig, train_perturbation_model
from celltune.tasks.perturbation.pairing import EpochShuffle

LR = 1e-3
STEPS = 3


def _config(batch_size: int) -> PerturbConfig:
    cfg = PerturbConfig()
    cfg.model.d_model = cfg.model.d_hid = 32
    cfg.model.nhead = 2
    cfg.model.nlayers = 1
    cfg.data.n_eval_ctrl = 40
    cfg.data.control_pool = 60
    # every step a full global batch, so each rank's loss is a mean over as many cells
    cfg.train = cfg.train.replace(
        epochs=1,
        batch_size=batch_size,
        max_steps_per_epoch=STEPS,
        lr=LR,
        scheduler="none",
        amp="off",
        quiet=True,
        device="cpu",
        seed=0,
    )
    return cfg


def train(data: str, out: str, batch_size: int) -> dict[str, torch.Tensor]:
    """Module level so spawned ranks can import it."""
    run = train_perturbation_model(data, out, _config(batch_size))
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def test_sampler_shares_are_disjoint_and_cover_the_global_batches() -> None:
    one = list(EpochShuffle(103, 10, seed=3, followers=[]))
    shares = [list(EpochShuffle(103, 5, seed=3, followers=[], rank=r, world=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(one) == 11
    for b, (s0, s1) in enumerate(zip(*shares, strict=True)):
        assert not set(s0) & set(s1)
        assert sorted(s0 + s1) == sorted(one[b])  # the ranks together = the global batch
    # a last global batch with fewer cells than ranks is dropped (DDP would stall)
    assert len(list(EpochShuffle(21, 5, seed=3, followers=[], rank=1, world=2))) == 2
    assert len(list(EpochShuffle(21, 5, seed=3, followers=[], rank=1, world=3))) == 2


@pytest.fixture(scope="module")
def prepared(adamson_mini_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from celltune.data.gears import prepare_perturbation_data, write_prepared

    path = tmp_path_factory.mktemp("adamson_ddp") / "data.h5ad"
    adata = ad.read_h5ad(adamson_mini_path)
    write_prepared(
        prepare_perturbation_data(adata, data_is_raw=False, split="simulation", seed=1), path
    )
    return str(path)


def test_two_gloo_ranks_match_one_process(prepared: str, tmp_path: Path) -> None:
    from celltune.train.distributed import run_in_processes

    single = train(prepared, str(tmp_path / "single"), 16)
    ranks = run_in_processes(train, 2, args=(prepared, str(tmp_path / "ddp"), 8), timeout=600)
    for key, value in single.items():
        for r in ranks:
            torch.testing.assert_close(r[key], ranks[0][key], rtol=0, atol=0)  # in sync
            if key.endswith("self_attn.in_proj_bias"):
                # the key bias has an exactly zero gradient (softmax is shift-invariant):
                # Adam turns rounding noise into steps of up to lr, so bound k by lr x steps
                q, k, v = r[key].view(3, -1)
                q0, k0, v0 = value.view(3, -1)
                torch.testing.assert_close(torch.cat([q, v]), torch.cat([q0, v0]))
                assert (k - k0).abs().max() <= LR * STEPS
                continue
            torch.testing.assert_close(r[key], value, rtol=1e-4, atol=1e-5, msg=key)
    first = _fresh_weights(prepared, tmp_path)  # the weights did train (not two inits)
    moved = max(float((first[k] - single[k]).abs().max()) for k in single)
    assert moved > 1e-4
    ddp = tmp_path / "ddp"
    for name in ("model", "history.csv", "config.yaml", "run.json", "controls.h5ad"):
        assert (ddp / name).exists(), name  # written by rank 0
    assert not (ddp / ".celltune.lock").exists()


def _fresh_weights(data: str, tmp_path: Path) -> dict[str, Any]:
    """The initial weights of the same configuration (seeded), within 1e-12: one step at
    lr 1e-12 (Adam moves each weight by at most lr)."""
    cfg = _config(16)
    cfg.train = cfg.train.replace(lr=1e-12, max_steps_per_epoch=1)
    run = train_perturbation_model(data, tmp_path / "init", cfg)
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_cli_devices_two_processes_write_one_run(
    prepared: str, tmp_path: Path, stream: bool
) -> None:
    """`perturb train --devices 2` (in memory and --stream) starts torchrun; rank 0 alone
    reports and writes."""
    import os
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "cli"
    cmd = [
        sys.executable, "-m", "celltune", "perturb", "train", prepared, "--out", str(out),
        "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet", "--devices", "2",
        "--set", "model.d_model=32", "--set", "model.d_hid=32", "--set", "model.nhead=2",
        "--set", "model.nlayers=1", "--set", "data.n_eval_ctrl=40",
        "--set", "data.control_pool=60", *(["--stream"] if stream else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting 2 processes" in proc.stderr
    assert proc.stdout.count("wrote") == 1  # rank 0 alone reports
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [1]
    assert (out / "model" / "best_model.pt").is_file() and (out / "run.json").is_file()
