"""The training loop on real expression data (Kang PBMC, a few hundred cells, tiny MLPs)."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from celltune.errors import InputError
from celltune.train import (
    BEST_STATE_NAME,
    CHECKPOINT_NAME,
    HISTORY_NAME,
    NonFiniteLossError,
    StepContext,
    TrainConfig,
    Trainer,
)

N_CELLS, N_GENES = 320, 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and leave the other core to the others)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def expr(kang_stim_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """log1p-normalised expression of 320 real cells × the 64 highest-mean genes (train, val)."""
    # imported here so that the subprocess of the kill test, which imports this module,
    # starts fast
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(kang_stim_path)
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, N_CELLS, replace=False))].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    x = np.asarray(adata.X.todense(), dtype=np.float32)
    x = x[:, np.argsort(-x.mean(0))[:N_GENES]]
    t = torch.from_numpy(x)
    return t[:256], t[256:]


def autoencoder(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(N_GENES, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, N_GENES)
    )


def step_fn(model: nn.Module, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict]:
    (x,) = batch
    recon = model(x)
    mse = ((recon.float() - x) ** 2).mean()
    return mse, {"mse": mse, "mae": (recon.float() - x).abs().mean()}


def make_eval_fn(val: torch.Tensor):
    def eval_fn(model: nn.Module, ctx: StepContext) -> dict[str, float]:
        x = val.to(ctx.device)
        recon = model(x)
        pc = torch.corrcoef(torch.stack([recon.flatten(), x.flatten()]))[0, 1]
        return {"val/loss": float(((recon - x) ** 2).mean()), "val/pearson": float(pc)}

    return eval_fn


def loader(x: torch.Tensor, batch_size: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=shuffle)


def cfg(**kw: Any) -> TrainConfig:
    base = dict(epochs=3, lr=3e-3, batch_size=16, device="cpu", quiet=True, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_loss_decreases_history_and_files(expr, tmp_path: Path) -> None:
    train, val = expr
    trainer = Trainer(
        autoencoder(), cfg(epochs=5), step_fn=step_fn, eval_fn=make_eval_fn(val), out_dir=tmp_path
    )
    hist = trainer.fit(loader(train, 16))
    losses = hist["train/loss"]
    assert len(hist) == 5 and losses[-1] < 0.8 * losses[0]
    assert hist["val/loss"][-1] < hist["val/loss"][0]
    # StepLR gamma 0.9 per epoch
    np.testing.assert_allclose(hist["lr"], [3e-3 * 0.9**e for e in range(5)], rtol=1e-9)
    rows = read_csv(tmp_path / HISTORY_NAME)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    for key in ("train/loss", "train/mse", "train/mae", "train/grad_norm", "val/loss", "lr"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    # the total equals the single term here, so the logged means must agree
    np.testing.assert_allclose(hist["train/loss"], hist["train/mse"], rtol=1e-6)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["epoch"] == 5 and len(ckpt["history"]) == 5
    best = torch.load(tmp_path / BEST_STATE_NAME, weights_only=True)
    assert set(best) == set(trainer.module.state_dict())
    assert hist.best_epoch == int(np.argmin(hist["val/loss"])) + 1
    assert not list(tmp_path.glob(".*.tmp"))  # no leftovers of atomic writes


class CrashError(RuntimeError):
    pass


def test_resume_after_crash_equals_uninterrupted_run(expr, tmp_path: Path) -> None:
    """Dropout + shuffling make the RNG state matter: resume must restore it exactly."""
    train, val = expr
    config = cfg(epochs=4)
    ref = Trainer(
        autoencoder(dropout=0.2),
        config,
        step_fn=step_fn,
        eval_fn=make_eval_fn(val),
        out_dir=tmp_path / "ref",
    )
    ref_hist = ref.fit(loader(train, 16))

    def crashing_step(model, batch, ctx):
        if ctx.epoch == 2 and ctx.batch_index == 3:
            raise CrashError("killed")
        return step_fn(model, batch, ctx)

    run_dir = tmp_path / "run"
    first = Trainer(
        autoencoder(dropout=0.2),
        config,
        step_fn=crashing_step,
        eval_fn=make_eval_fn(val),
        out_dir=run_dir,
    )
    with pytest.raises(CrashError):
        first.fit(loader(train, 16))
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["epoch"] == 2
    # a fresh process would build the model from another init: resume must overwrite it
    resumed = Trainer(
        autoencoder(seed=123, dropout=0.2),
        config,
        step_fn=step_fn,
        eval_fn=make_eval_fn(val),
        out_dir=run_dir,
    )
    hist = resumed.fit(loader(train, 16), resume=True)
    for k, v in ref.module.state_dict().items():
        assert torch.equal(v, resumed.module.state_dict()[k]), k
    assert hist["train/loss"] == ref_hist["train/loss"]
    assert hist["val/loss"] == ref_hist["val/loss"]
    assert resumed.global_step == ref.global_step == 4 * 16
    # resuming a finished run does nothing
    again = Trainer(
        autoencoder(seed=5), config, step_fn=step_fn, eval_fn=make_eval_fn(val), out_dir=run_dir
    )
    assert len(again.fit(loader(train, 16), resume=True)) == 4


def scripted_eval(values: list[float], snapshots: list[dict[str, torch.Tensor]], key: str):
    """Known metric sequence; records the weights seen at each evaluation."""

    def eval_fn(model: nn.Module, ctx: StepContext) -> dict[str, float]:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {key: values[ctx.epoch]}

    return eval_fn


def test_early_stopping_and_best_model_min(expr, tmp_path: Path) -> None:
    train, _ = expr
    snaps: list[dict[str, torch.Tensor]] = []
    trainer = Trainer(
        autoencoder(),
        cfg(epochs=10, patience=2, max_steps_per_epoch=2),
        step_fn=step_fn,
        eval_fn=scripted_eval([3.0, 2.0, 2.5, 2.0, 1.0, 0.5], snaps, "val/loss"),
        out_dir=tmp_path,
    )
    hist = trainer.fit(loader(train, 16))
    # epoch 2 is best; epochs 3 and 4 do not improve (2.0 is not < 2.0) → stop after 4
    assert len(hist) == 4 and hist.stopped_early
    assert hist.best_epoch == 2 and hist.best_metric == 2.0
    assert trainer.global_step == 4 * 2  # max_steps_per_epoch respected
    model = trainer.best_model()
    for k, v in model.state_dict().items():
        assert torch.equal(v, snaps[1][k])
    # a resumed early-stopped run stays stopped
    again = Trainer(
        autoencoder(),
        trainer.config,
        step_fn=step_fn,
        eval_fn=scripted_eval([9.0] * 10, [], "val/loss"),
        out_dir=tmp_path,
    )
    assert len(again.fit(loader(train, 16), resume=True)) == 4


def test_best_model_by_max_metric(expr, tmp_path: Path) -> None:
    train, val = expr
    snaps: list[dict[str, torch.Tensor]] = []
    trainer = Trainer(
        autoencoder(),
        cfg(epochs=4, select_metric="val/pearson_delta", select_mode="max", max_steps_per_epoch=1),
        step_fn=step_fn,
        eval_fn=scripted_eval([0.1, 0.7, 0.3, float("nan")], snaps, "val/pearson_delta"),
        out_dir=tmp_path,
    )
    hist = trainer.fit(loader(train, 16))
    assert hist.best_epoch == 2 and len(hist) == 4  # NaN never counts as an improvement
    for k, v in trainer.best_model().state_dict().items():
        assert torch.equal(v, snaps[1][k])
    # real metric: best epoch is the argmax of the recorded validation Pearson
    real = Trainer(
        autoencoder(),
        cfg(epochs=4, select_metric="val/pearson", select_mode="max"),
        step_fn=step_fn,
        eval_fn=make_eval_fn(val),
        out_dir=tmp_path / "real",
    )
    hist = real.fit(loader(train, 32))
    assert hist.best_epoch == int(np.argmax(hist["val/pearson"])) + 1


@pytest.mark.parametrize("n_cells", [256, 200])  # 200: a short last accumulation group
def test_grad_accumulation_equals_larger_batch(expr, tmp_path: Path, n_cells: int) -> None:
    train = expr[0][:n_cells]
    big = Trainer(autoencoder(), cfg(epochs=2), step_fn=step_fn, out_dir=tmp_path / "big")
    big.fit(loader(train, 16, shuffle=False))
    acc = Trainer(
        autoencoder(), cfg(epochs=2, grad_accum=2), step_fn=step_fn, out_dir=tmp_path / "acc"
    )
    acc.fit(loader(train, 8, shuffle=False))
    assert acc.global_step == big.global_step == 2 * math.ceil(n_cells / 16)
    for k, v in big.module.state_dict().items():
        torch.testing.assert_close(acc.module.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_nan_loss_names_step_and_terms(expr, tmp_path: Path) -> None:
    train, _ = expr

    def bad_step(model, batch, ctx):
        loss, terms = step_fn(model, batch, ctx)
        if ctx.epoch == 1 and ctx.batch_index == 2:
            terms["mse"] = torch.tensor(float("nan"))
            loss = loss * float("nan")
        return loss, terms

    trainer = Trainer(autoencoder(), cfg(), step_fn=bad_step, out_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, mini-batch 3.*mse=nan.*lower"):
        trainer.fit(loader(train, 16))


def test_missing_select_metric_is_input_error(expr, tmp_path: Path) -> None:
    train, val = expr
    trainer = Trainer(
        autoencoder(),
        cfg(epochs=1, select_metric="val/mse"),
        step_fn=step_fn,
        eval_fn=make_eval_fn(val),
        out_dir=tmp_path,
    )
    with pytest.raises(InputError, match=r"val/mse.*val/loss"):
        trainer.fit(loader(train, 16))


def test_without_eval_fn_selects_on_train_loss(expr, tmp_path: Path) -> None:
    trainer = Trainer(autoencoder(), cfg(epochs=2), step_fn=step_fn, out_dir=tmp_path)
    hist = trainer.fit(loader(expr[0], 32))
    assert hist.select_metric == "train/loss"
    assert hist.best_epoch == int(np.argmin(hist["train/loss"])) + 1


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu_runs_under_autocast(expr, tmp_path: Path, amp: str) -> None:
    train, val = expr
    seen: list[torch.dtype] = []

    def amp_step(model, batch, ctx):
        (x,) = batch
        seen.append(model(x).dtype)  # autocast makes Linear outputs low precision
        return step_fn(model, batch, ctx)

    trainer = Trainer(
        autoencoder(),
        cfg(epochs=3, amp=amp, lr=1e-2),
        step_fn=amp_step,
        eval_fn=make_eval_fn(val),
        out_dir=tmp_path,
    )
    hist = trainer.fit(loader(train, 32))
    want = torch.bfloat16 if amp == "bf16" else torch.float16
    assert set(seen) == {want}
    assert hist["train/loss"][-1] < hist["train/loss"][0]
    eps = trainer.optimizer.param_groups[0]["eps"]
    assert eps == (1e-4 if amp == "fp16" else 1e-8)
    scaler = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["scaler"]
    assert (scaler is not None) == (amp == "fp16")


def test_set_epoch_reaches_sampler_dataset_and_collate(expr, tmp_path: Path) -> None:
    calls: dict[str, list[int]] = {"sampler": [], "dataset": [], "collate": []}

    class Sampler(torch.utils.data.Sampler[int]):
        def __init__(self, n: int) -> None:
            self.n, self.epoch = n, 0

        def set_epoch(self, epoch: int) -> None:
            calls["sampler"].append(epoch)
            self.epoch = epoch

        def __iter__(self):
            return iter(np.random.default_rng([0, self.epoch]).permutation(self.n).tolist())

        def __len__(self) -> int:
            return self.n

    class Data(TensorDataset):
        def set_epoch(self, epoch: int) -> None:
            calls["dataset"].append(epoch)

    class Collate:
        def set_epoch(self, epoch: int) -> None:
            calls["collate"].append(epoch)

        def __call__(self, items):
            return (torch.stack([i[0] for i in items]),)

    train = expr[0]
    dl = DataLoader(Data(train), batch_size=32, sampler=Sampler(len(train)), collate_fn=Collate())
    Trainer(autoencoder(), cfg(epochs=3), step_fn=step_fn, out_dir=tmp_path).fit(dl)
    assert calls == {"sampler": [0, 1, 2], "dataset": [0, 1, 2], "collate": [0, 1, 2]}


def test_config_validation_and_resolution() -> None:
    with pytest.raises(InputError, match="amp must be one of"):
        TrainConfig(amp="fp8")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(InputError, match=r"learning_rate.*valid options"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    c = TrainConfig.from_dict(TrainConfig(epochs=7).to_dict())
    assert c.epochs == 7 and c.lr == 1e-4 and c.batch_size == 64 and c.gamma == 0.9
    cpu = torch.device("cpu")
    assert c.resolve_amp(cpu) == "off"
    assert c.resolve_amp(torch.device("cuda", 0)) == "fp16"
    assert c.resolve_adam_eps("fp16") == 1e-4 and c.resolve_adam_eps("off") == 1e-8
    assert c.resolve_pin_memory(cpu) is False
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            TrainConfig(device="cuda").resolve_device()


def killable_run(data_path: str, out_dir: str, kill_epoch: int | None, resume: bool) -> None:
    """Train as the resume tests do; SIGKILL this very process at a chosen mini-batch."""
    torch.set_num_threads(1)
    train, val = torch.load(data_path, weights_only=True)

    def dying_step(model, batch, ctx):
        if ctx.epoch == kill_epoch and ctx.batch_index == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return step_fn(model, batch, ctx)

    trainer = Trainer(
        autoencoder(seed=99, dropout=0.2),
        cfg(epochs=4),
        step_fn=dying_step,
        eval_fn=make_eval_fn(val),
        out_dir=out_dir,
    )
    trainer.fit(loader(train, 16), resume=resume)


@pytest.mark.e2e
def test_sigkilled_process_resumes_to_the_same_weights(expr, tmp_path: Path) -> None:
    data_path = tmp_path / "data.pt"
    torch.save(list(expr), data_path)
    run_dir = tmp_path / "run"
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_train_loop as t; "
        f"t.killable_run({str(data_path)!r}, {str(run_dir)!r}, 2, False)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["epoch"] == 2
    killable_run(str(data_path), str(run_dir), None, resume=True)
    killable_run(str(data_path), str(tmp_path / "ref"), None, resume=False)
    got = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    ref = torch.load(tmp_path / "ref" / CHECKPOINT_NAME, weights_only=True)
    assert got["epoch"] == ref["epoch"] == 4
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert [r["train/loss"] for r in got["history"]] == [r["train/loss"] for r in ref["history"]]


def test_time_estimate_skips_the_warm_up_batches(expr, tmp_path: Path, caplog) -> None:
    """The estimate is printed once, from ETA_BATCHES mini-batches after the first
    ETA_SKIP: a slow first mini-batch (warm-up) must not inflate it."""
    import logging
    import time as _time

    from celltune.train.progress import ETA_BATCHES, ETA_SKIP

    train, _ = expr
    calls = {"n": 0}

    def slow_first(model: nn.Module, batch: Any, ctx: StepContext):
        calls["n"] += 1
        if calls["n"] == 1:
            _time.sleep(3.0)  # what a first step's allocation and loader start cost
        return step_fn(model, batch, ctx)

    assert len(train) // 16 >= ETA_SKIP + ETA_BATCHES
    trainer = Trainer(autoencoder(), cfg(epochs=2), step_fn=slow_first, out_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="celltune.train.loop"):
        trainer.fit(loader(train, 16))
    lines = [r.getMessage() for r in caplog.records if "estimated training time" in r.message]
    assert len(lines) == 1
    minutes = float(lines[0].split("estimated training time: ")[1].split(" min")[0])
    assert minutes < 0.05  # 32 tiny steps; with the 3 s first step counted it would be ~0.3
