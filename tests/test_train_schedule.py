"""Warm-up + cosine learning-rate schedule (issue 16) on the real-data training loop."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from test_train_loop import autoencoder, cfg, loader, step_fn
from test_train_loop import expr as expr  # fixture
from test_train_loop import one_thread as one_thread  # fixture

from celltune.errors import InputError
from celltune.train import TrainConfig, Trainer
from celltune.train.schedule import budget_epochs, cosine_lr


def test_cosine_lr_warms_up_linearly_then_decays_to_the_floor() -> None:
    lrs = [cosine_lr(s, 1e-3, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    mid = 10 + 45
    assert lrs[mid] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_lr(5, 1e-3, 0, 0, 0.1) == 1e-3  # unknown length: hold


def test_trainer_follows_the_cosine_schedule_and_resumes_it(expr, tmp_path: Path) -> None:
    train, _ = expr
    config = cfg(epochs=3, scheduler="cosine", warmup_steps=5, min_lr_ratio=0.1)
    ref = Trainer(autoencoder(), config, step_fn=step_fn, out_dir=tmp_path / "ref")
    hist = ref.fit(loader(train, 16))
    total = 3 * 16
    assert ref.total_steps == total
    # the lr of each epoch's first step, as logged
    want = [cosine_lr(e * 16 - 1, config.lr, total, 5, 0.1) if e else config.lr for e in range(3)]
    assert hist["lr"][1:] == pytest.approx(want[1:])
    last = ref.optimizer.param_groups[0]["lr"]
    assert last == pytest.approx(cosine_lr(total - 1, config.lr, total, 5, 0.1))

    # killed in the third epoch, then resumed: the same weights (the lr is a function of
    # the step, so no scheduler state is needed)
    def crashing_step(model, batch, ctx):
        if ctx.epoch == 2 and ctx.batch_index == 3:
            raise RuntimeError("killed")
        return step_fn(model, batch, ctx)

    part = Trainer(autoencoder(), config, step_fn=crashing_step, out_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match="killed"):
        part.fit(loader(train, 16))
    resumed = Trainer(autoencoder(seed=7), config, step_fn=step_fn, out_dir=tmp_path / "run")
    resumed.fit(loader(train, 16), resume=True)
    for k, v in ref.module.state_dict().items():
        assert torch.equal(v, resumed.module.state_dict()[k]), k


def test_bad_schedule_settings_are_refused() -> None:
    with pytest.raises(InputError, match="warmup_steps"):
        TrainConfig(scheduler="cosine", warmup_steps=-1)
    with pytest.raises(InputError, match="scheduler"):
        TrainConfig(scheduler="linear")


def test_step_budget_sets_whole_epochs(expr) -> None:
    train, _ = expr
    dl = loader(train, 16)  # 16 mini-batches per epoch
    assert budget_epochs(dl, cfg(epochs=30, max_steps=40)) == 3  # ceil(40 / 16)
    assert budget_epochs(dl, cfg(epochs=2, max_steps=1000)) == 2  # never above epochs
    assert budget_epochs(dl, cfg(epochs=30, max_steps=40, grad_accum=2)) == 5  # 8 steps/epoch
    assert budget_epochs(dl, cfg(epochs=30)) == 30
    with pytest.raises(InputError, match="max_steps"):
        cfg(max_steps=0)
