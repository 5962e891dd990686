"""DDP on 2 CPU processes (gloo): helpers, and equivalence with one process.

Spawning ranks costs seconds (each imports torch), so one spawn checks both the helpers
and the training equivalence. ``celltune.train.distributed.run_in_processes`` spawns them
with the environment torchrun would set; worker functions live at module level so the
spawned interpreters can import them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from celltune.train import HISTORY_NAME, StepContext, TrainConfig, Trainer
from celltune.train import distributed as D

N_GENES = 48


class GlobalOrderBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global batches from a per-epoch seeded permutation; each rank takes its slice.

    With ``num_replicas=1`` and ``global_batch`` it yields exactly the union of what the
    ranks see, which is what makes single- and multi-process training comparable.
    """

    def __init__(self, n: int, global_batch: int, *, num_replicas: int = 1, rank: int = 0):
        self.n, self.global_batch = n, global_batch
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        perm = np.random.default_rng([7, self.epoch]).permutation(self.n)
        per = self.global_batch // self.num_replicas
        for start in range(0, self.n - self.global_batch + 1, self.global_batch):
            yield perm[start + self.rank * per : start + (self.rank + 1) * per].tolist()

    def __len__(self) -> int:
        return self.n // self.global_batch


def regressor(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_GENES - 1, 16), nn.Tanh(), nn.Linear(16, 1))


def step_fn(model: nn.Module, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict]:
    """Predict the last gene from the others; the loss is a mean (DDP averages gradients)."""
    (x,) = batch
    pred = model(x[:, :-1]).squeeze(-1)
    mse = ((pred - x[:, -1]) ** 2).mean()
    return mse, {"mse": mse}


def make_eval_fn(val: torch.Tensor):
    def eval_fn(model: nn.Module, ctx: StepContext) -> dict[str, float]:
        # each rank scores its half; the Trainer must average over ranks
        part = val.chunk(ctx.world_size)[ctx.rank]
        pred = model(part[:, :-1]).squeeze(-1)
        return {"val/loss": float(((pred - part[:, -1]) ** 2).mean()), "val/rank": ctx.rank}

    return eval_fn


def train_run(
    x: torch.Tensor,
    val: torch.Tensor,
    out_dir: str,
    epochs: int,
    global_batch: int = 16,
    grad_accum: int = 1,
) -> dict[str, Any]:
    """One training run; the sampler shards by the current process group (if any)."""
    sampler = GlobalOrderBatchSampler(
        len(x), global_batch, num_replicas=D.world_size(), rank=D.rank()
    )
    config = TrainConfig(
        epochs=epochs, lr=3e-3, device="cpu", quiet=True, grad_clip=0.5, grad_accum=grad_accum
    )
    trainer = Trainer(
        regressor(), config, step_fn=step_fn, eval_fn=make_eval_fn(val), out_dir=out_dir
    )
    hist = trainer.fit(DataLoader(TensorDataset(x), batch_sampler=sampler))
    return {
        "state": {k: v.clone() for k, v in trainer.module.state_dict().items()},
        "history": hist.records,
        "steps": trainer.global_step,
    }


@pytest.fixture(scope="module")
def data(kang_donors_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    # imported here so the spawned ranks, which import this module, start fast
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(kang_donors_path)
    rng = np.random.default_rng(1)
    adata = adata[np.sort(rng.choice(adata.n_obs, 160, replace=False))].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    x = np.asarray(adata.X.todense(), dtype=np.float32)
    x = torch.from_numpy(x[:, np.argsort(-x.mean(0))[:N_GENES]].copy())
    return x[:128], x[128:160]


def test_single_process_defaults() -> None:
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main_process()
    t = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_with_grad(t) is t
    assert D.all_reduce_mean({"a": 2.0}) == {"a": 2.0}
    assert not D.init_distributed()  # not launched by torchrun: stays single-process
    D.barrier()


def gather_worker() -> dict[str, Any]:
    r = D.rank()
    local = torch.full((2, 3), float(r + 1), requires_grad=True)
    full = D.all_gather_with_grad(local)
    weights = torch.arange(full.shape[0], dtype=torch.float32)[:, None]
    (full * weights).sum().backward()
    return {
        "rank": r,
        "world": D.world_size(),
        "main": D.is_main_process(),
        "full": full.detach(),
        "grad": local.grad,
        "mean": D.all_reduce_mean({"x": float(r), "y": 10.0 * r, f"only{r}": 3.0 + r}),
        "objects": D.all_gather_object(f"r{r}"),
    }


def early_stop_run(x: torch.Tensor, out_dir: str) -> int:
    """A rising validation loss must stop every rank at the same epoch (no hang)."""

    def rising(model: nn.Module, ctx: StepContext) -> dict[str, float]:
        return {"val/loss": float(ctx.epoch + ctx.rank)}

    sampler = GlobalOrderBatchSampler(len(x), 16, num_replicas=D.world_size(), rank=D.rank())
    config = TrainConfig(epochs=6, device="cpu", quiet=True, patience=2, max_steps_per_epoch=1)
    trainer = Trainer(regressor(), config, step_fn=step_fn, eval_fn=rising, out_dir=out_dir)
    return len(trainer.fit(DataLoader(TensorDataset(x), batch_sampler=sampler)))


def ddp_worker(x: torch.Tensor, val: torch.Tensor, out_dir: str) -> dict[str, Any]:
    return {
        "gather": gather_worker(),
        "train": train_run(x, val, out_dir, 2),
        # 2 ranks × 4 cells × 2 accumulated mini-batches = the same 16-cell global step
        "accum": train_run(x, val, out_dir + "_accum", 2, global_batch=8, grad_accum=2),
        "early_stop_epochs": early_stop_run(x, out_dir + "_stop"),
    }


def check_gather(out: list[dict[str, Any]]) -> None:
    for r, res in enumerate(out):
        assert res["rank"] == r and res["world"] == 2 and res["main"] == (r == 0)
        expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
        assert torch.equal(res["full"], expected)
        # gradient reaches only the local rows: the weights of rows 2r, 2r+1
        want = torch.tensor([2.0 * r, 2.0 * r + 1.0])[:, None].expand(2, 3)
        assert torch.equal(res["grad"], want)
        assert res["mean"] == {"x": 0.5, "y": 5.0, "only0": 3.0, "only1": 4.0}
        assert res["objects"] == ["r0", "r1"]


def failing_worker() -> None:
    if D.rank() == 1:
        raise ValueError("boom on rank 1")
    D.barrier()  # rank 0 would wait forever: the helper must terminate it


@pytest.mark.e2e
def test_failure_on_one_rank_is_reported() -> None:
    with pytest.raises(RuntimeError, match=r"rank 1 failed:[\s\S]*boom on rank 1"):
        D.run_in_processes(failing_worker, 2, timeout=120)


@pytest.mark.e2e
def test_ddp_two_processes_equal_single_process(data, tmp_path: Path) -> None:
    x, val = data
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_run(x, val, str(tmp_path / "single"), epochs=2)
    finally:
        torch.set_num_threads(before)
    out = D.run_in_processes(ddp_worker, 2, args=(x, val, str(tmp_path / "ddp")))
    check_gather([o["gather"] for o in out])
    ranks = [o["train"] for o in out]
    assert single["steps"] == ranks[0]["steps"] == ranks[1]["steps"] == 2 * 8
    for res in ranks:
        for k, v in single["state"].items():
            torch.testing.assert_close(res["state"][k], v, rtol=1e-4, atol=1e-5)
    # training loss means are averaged over ranks → equal to the single-process means
    np.testing.assert_allclose(
        [r["train/loss"] for r in ranks[0]["history"]],
        [r["train/loss"] for r in single["history"]],
        rtol=1e-4,
    )
    # validation metrics are averaged over ranks (each rank scored its own half)
    assert [r["val/rank"] for r in ranks[1]["history"]] == [0.5, 0.5]
    np.testing.assert_allclose(
        [r["val/loss"] for r in ranks[0]["history"]],
        [r["val/loss"] for r in single["history"]],
        rtol=1e-4,
    )
    for res in (o["accum"] for o in out):
        assert res["steps"] == 2 * 8
        for k, v in single["state"].items():
            torch.testing.assert_close(res["state"][k], v, rtol=1e-4, atol=1e-5)
    assert [o["early_stop_epochs"] for o in out] == [3, 3]
    assert (tmp_path / "ddp" / HISTORY_NAME).is_file()
    assert (tmp_path / "ddp" / "checkpoint.pt").is_file()
