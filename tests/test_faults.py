"""Fault injection: concurrent runs, killed renames, disk full, malformed model directories.

Each test asserts the error (type and message) and that nothing partial is left under a
final name. Issue 14's numbered defects are named in each test's docstring.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from celltune import files
from celltune.errors import CelltuneError, CheckpointError, InputError
from celltune.files import RunLock, atomic_path, clean_orphan_temps, write_text_atomic
from celltune.model import load_model, save_model

pytestmark = pytest.mark.faults


def _fixture_copy(fixtures_dir: Path, dst: Path) -> Path:
    shutil.copytree(
        fixtures_dir / "fixture_integration", dst, ignore=shutil.ignore_patterns("golden")
    )
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


# -- 1. two runs into one --out -------------------------------------------------------------
def test_second_run_into_locked_dir_is_refused(tmp_path: Path) -> None:
    """Defect 1: a live owner's lock refuses a second run; the owner is named."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / files.LOCK_NAME).write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname()})
        )
        with pytest.raises(InputError, match=rf"in use by another celltune run \(pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the owner is gone now: the lock is stale and taken over
    lock = RunLock(tmp_path).acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_concurrent_processes_one_wins(tmp_path: Path) -> None:
    """Defect 1: of two processes that lock the same directory, exactly one gets it."""
    code = (
        "import sys, time; from celltune.files import RunLock\n"
        "try:\n    RunLock(sys.argv[1]).acquire()\nexcept Exception as e:\n"
        "    print(e); sys.exit(2)\nprint('ok'); sys.stdout.flush(); time.sleep(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    assert any("in use by another celltune run" in o for o, _ in outs)


def test_integration_run_dir_takes_the_lock(tmp_path: Path) -> None:
    """Defect 1: the integrate workflow claims its --out before writing anything."""
    from celltune.tasks.integration import open_run_dir, resolve_config

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        out.mkdir()
        (out / files.LOCK_NAME).write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname()})
        )
        cfg = resolve_config({"data": {"batch_key": "batch"}})
        with pytest.raises(InputError, match="in use by another celltune run"):
            open_run_dir(cfg, out, False)
        assert sorted(p.name for p in out.iterdir()) == [files.LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


# -- 2. model directories that load as random / garbage models ------------------------------
def test_empty_state_dict_is_refused_unless_partial(fixtures_dir: Path, tmp_path: Path) -> None:
    """Defect 2: {} beside valid args/vocab used to embed with random weights."""
    d = _fixture_copy(fixtures_dir, tmp_path / "m")
    torch.save({}, d / "best_model.pt")
    with pytest.raises(CheckpointError, match=r"set only 0% .*--allow-partial"):
        load_model(d)
    model = load_model(d, allow_partial=True)
    assert not model.load_report.loaded


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_weights_are_refused(fixtures_dir, tmp_path, dtype) -> None:
    """Defect 2: int64/bool tensors in model.safetensors were cast silently."""
    from safetensors.torch import save_file

    d = _fixture_copy(fixtures_dir, tmp_path / "m")
    sd = torch.load(d / "best_model.pt", weights_only=True)
    sd["encoder.embedding.weight"] = sd["encoder.embedding.weight"].to(dtype)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"encoder.embedding.weight.*{dtype}.*not a float"):
        load_model(d)


def test_half_weights_are_cast_and_load(fixtures_dir, tmp_path) -> None:
    d = _fixture_copy(fixtures_dir, tmp_path / "m")
    sd = torch.load(d / "best_model.pt", weights_only=True)
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, d / "best_model.pt"
    )
    model = load_model(d)
    assert next(model.parameters()).dtype == torch.float32


def test_nan_weights_are_refused(fixtures_dir, tmp_path) -> None:
    """Defect 2: NaN weights gave all-NaN embeddings."""
    d = _fixture_copy(fixtures_dir, tmp_path / "m")
    sd = torch.load(d / "best_model.pt", weights_only=True)
    sd["transformer_encoder.layers.0.linear1.weight"][0, 0] = float("nan")
    torch.save(sd, d / "best_model.pt")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_model(d)


@pytest.mark.parametrize("d_hid", [200_000, 5_000_000, 1_000_000_000])
def test_args_d_hid_checked_against_weights_before_allocation(fixtures_dir, tmp_path, d_hid):
    """Defect 2: a wrong d_hid built a 650 M model or tried to allocate 128 GB."""
    d = _fixture_copy(fixtures_dir, tmp_path / "m")
    args = json.loads((d / "args.json").read_text())
    args["d_hid"] = d_hid
    (d / "args.json").write_text(json.dumps(args))
    # in range: caught by the shape check; absurd: caught by the range check
    expected = "linear1.weight has shape" if d_hid <= 262144 else r"d_hid=\d+ is not an integer"
    with pytest.raises(CheckpointError, match=expected):
        load_model(d)


def test_corrupted_weight_bytes_are_refused(fixtures_dir, tmp_path) -> None:
    """Defect 2: five-byte corruptions of a saved best_model.pt loaded without complaint."""
    model = load_model(fixtures_dir / "fixture_integration")
    d = save_model(model, tmp_path / "saved")
    (d / "model.safetensors").unlink()  # make best_model.pt the file that is read
    raw = bytearray((d / "best_model.pt").read_bytes())
    failures = 0
    for i in range(10):
        bad = bytearray(raw)
        pos = (len(raw) * (i + 1)) // 12
        bad[pos : pos + 5] = b"\xff\x00\xff\x00\xff"
        (d / "best_model.pt").write_bytes(bytes(bad))
        with pytest.raises(CheckpointError):
            load_model(d)
        failures += 1
    assert failures == 10


def test_malformed_args_and_vocab(fixtures_dir, tmp_path) -> None:
    """Defect 9 (model side): malformed args.json/vocab.json give one CheckpointError."""
    d = _fixture_copy(fixtures_dir, tmp_path / "m")
    good = (d / "args.json").read_text()
    for text in ("[1, 2]", "{not json", '{"embsize": 32}'):
        (d / "args.json").write_text(text)
        with pytest.raises(CheckpointError):
            load_model(d)
    (d / "args.json").write_text(good)
    (d / "vocab.json").write_text('{"a": "x"}')
    with pytest.raises(CheckpointError, match="vocab"):
        load_model(d)


def test_not_a_checkpoint_is_one_error(fixtures_dir, tmp_path) -> None:
    """Defect 9: a best_model.pt that is not a checkpoint (text bytes) → CheckpointError."""
    d = _fixture_copy(fixtures_dir, tmp_path / "m")
    (d / "best_model.pt").write_bytes(b"hello, this is not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read as plain tensors"):
        load_model(d)


# -- 4. the model directory as one unit ---------------------------------------------------
def test_save_model_killed_midway_leaves_old_directory(fixtures_dir, tmp_path, monkeypatch):
    """Defect 4: a kill between best_model.pt and model.safetensors left them disagreeing."""
    import safetensors.torch

    model = load_model(fixtures_dir / "fixture_integration")
    d = save_model(model, tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temp dir left


# -- 7 / 10. killed renames, fsync, disk full, orphan temp files ------------------------------
def test_failed_rename_keeps_old_file_and_no_temp(tmp_path, monkeypatch) -> None:
    """Defect 10: a failure injected at the rename leaves the old file, no temp file."""
    target = tmp_path / "out.txt"
    target.write_text("old")

    def boom(src, dst):
        raise KeyboardInterrupt("killed at rename")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch) -> None:
    """Defect 10: the data is fsynced before the name points at it."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))
    )
    write_text_atomic(tmp_path / "x.txt", "data")
    assert events.index("fsync") < events.index("replace")
    assert events[-1] == "fsync"  # the directory entry too


def test_orphan_temp_files_are_cleaned(tmp_path) -> None:
    """Defect 10: .tmp files left by a kill are removed by the next run's claim."""
    (tmp_path / ".history.csv.abc123.tmp").write_text("half")
    (tmp_path / ".model.xyz.tmp").mkdir()
    (tmp_path / "history.csv").write_text("kept")
    removed = clean_orphan_temps(tmp_path)
    assert len(removed) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


def test_os_error_is_one_message_naming_the_path(tmp_path, monkeypatch) -> None:
    """Defect 7: ENOSPC inside a writer becomes one message with path and free space."""
    import errno

    target = tmp_path / "big.bin"
    with (
        pytest.raises(CelltuneError, match=r"no space left .*big.bin.*MB free"),
        atomic_path(target) as tmp,
    ):
        tmp.write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def _tiny_fs(tmp_path: Path) -> Path:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    return mnt


def test_enospc_on_tiny_filesystem(tmp_path) -> None:
    """Defect 7: a real full disk: one message, nothing under the final name, no temp."""
    mnt = _tiny_fs(tmp_path)
    try:
        target = mnt / "out.txt"
        with pytest.raises(CelltuneError, match=r"no space left .*out.txt"):
            write_text_atomic(target, "x" * 2_000_000)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- 3. resume checks what it resumes -------------------------------------------------------
def test_resume_on_other_input_is_refused(kang_stim_path: Path, tmp_path: Path) -> None:
    """Defect 3: --resume on a different file used to continue with remapped token ids."""
    import anndata as ad
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from celltune.train import TrainConfig, Trainer, input_fingerprint

    full = ad.read_h5ad(kang_stim_path)
    a, b = full[:200, :50].copy(), full[200:400, :50].copy()
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=50, device="cpu", quiet=True, seed=0)

    def step(model, batch, ctx):
        (x,) = batch
        loss = ((model(x) - x) ** 2).mean()
        return loss, {"mse": loss}

    def run(adata, epochs, resume):
        x = torch.from_numpy(adata.X.toarray().astype("float32"))
        torch.manual_seed(0)
        t = Trainer(
            nn.Linear(50, 50),
            TrainConfig(**{**cfg.to_dict(), "epochs": epochs}),
            step_fn=step,
            out_dir=tmp_path,
            fingerprint=input_fingerprint(adata, {"g": 0}),
        )
        return t.fit(DataLoader(TensorDataset(x), batch_size=50), resume=resume)

    run(a, 1, False)
    with pytest.raises(InputError, match=r"input differs .*obs_names"):
        run(b, 2, True)
    assert len(run(a, 2, True)) == 2  # the original input still resumes


@pytest.mark.parametrize(
    "key,value",
    [
        ("nheads", None),
        ("nheads", 0),
        ("nheads", "four"),
        ("dropout", "high"),
        ("d_hid", 10**12),
        ("embsize", True),
    ],
)
def test_bad_args_values_are_one_error(fixtures_dir, tmp_path, key, value) -> None:
    """Defect 9: model inspect with nheads null/0/"four" or dropout "high" gave tracebacks."""
    d = _fixture_copy(fixtures_dir, tmp_path / "m")
    args = json.loads((d / "args.json").read_text())
    args[key] = value
    (d / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match=rf"args.json {key}="):
        load_model(d)


def test_cli_inspect_partial_and_bad_args(fixtures_dir, tmp_path) -> None:
    """Defects 2 and 9 at the CLI: exit 2 with one line; --allow-partial prints the report."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    d = _fixture_copy(fixtures_dir, tmp_path / "m")
    torch.save({}, d / "best_model.pt")
    cmd = [sys.executable, "-m", "celltune", "model", "inspect", str(d)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Error:" in r.stderr + r.stdout
    assert "--allow-partial" in r.stderr + r.stdout and "Traceback" not in r.stderr
    r = subprocess.run([*cmd, "--allow-partial"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "loaded 0 tensors" in r.stdout


# -- 5 / 6 / 8 / 9. one input-validation layer at the commands -------------------------------
@pytest.fixture(scope="module")
def pert_raw(papalexi_path, tmp_path_factory) -> Path:
    import anndata as ad
    import numpy as np

    full = ad.read_h5ad(papalexi_path)
    keep = np.sort(np.random.default_rng(0).choice(full.n_obs, 1500, replace=False))
    path = tmp_path_factory.mktemp("pert") / "raw.h5ad"
    full[keep].copy().write_h5ad(path)
    return path


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    from celltune.cli.main import app

    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("not_raw", [False, True])
def test_perturb_prepare_refuses_nan(pert_raw, tmp_path, not_raw) -> None:
    """Defect 5: NaN/inf passed perturb prepare (also with --not-raw)."""
    import anndata as ad

    a = ad.read_h5ad(pert_raw)
    a.X = a.X.toarray()
    a.X[0, 0], a.X[1, 1] = float("nan"), float("inf")
    bad = tmp_path / "bad.h5ad"
    a.write_h5ad(bad)
    out = tmp_path / "data.h5ad"
    res = _invoke(["perturb", "prepare", str(bad), "--out", str(out)] + ["--not-raw"] * not_raw)
    assert res.exit_code == 2, res.output
    assert "1 NaN and 1 infinite" in res.output
    assert not out.exists()


def test_out_equal_to_input_is_refused(pert_raw, kang_stim_path, tmp_path) -> None:
    """Defect 6: --out equal to the input replaced the input file."""
    src = tmp_path / "in.h5ad"
    shutil.copy(kang_stim_path, src)
    before = files.sha256_file(src)
    for args in (
        ["preprocess", str(src), "--out", str(src)],
        ["embed", str(src), "--model", str(tmp_path), "--out", str(src)],
        ["perturb", "prepare", str(src), "--out", str(tmp_path / "." / "in.h5ad")],
    ):
        res = _invoke(args)
        # the root app raises InputError; celltune.cli.main.main prints it and exits 2
        message = res.output if res.exit_code == 2 else str(res.exception)
        assert res.exit_code == 2 or isinstance(res.exception, InputError), (args, res.output)
        assert "is the input file" in message
    assert files.sha256_file(src) == before


def test_one_cell_condition_is_prepared_not_a_traceback(pert_raw, tmp_path) -> None:
    """Defect 9: perturb prepare with a one-cell condition gave a traceback.

    A condition too small for GEARS' t-test gets its DE genes ranked by |mean change|
    (``uns['de_by_abs_change']``, the issue-15 decision) instead of stopping the run."""
    import anndata as ad

    a = ad.read_h5ad(pert_raw)
    a.obs["condition"] = a.obs["condition"].astype(str)
    a.obs.iloc[0, a.obs.columns.get_loc("condition")] = "ONLYONE+ctrl"
    bad = tmp_path / "one.h5ad"
    a.write_h5ad(bad)
    res = _invoke(["perturb", "prepare", str(bad), "--out", str(tmp_path / "o.h5ad")])
    assert res.exit_code == 0, res.output
    prepared = ad.read_h5ad(tmp_path / "o.h5ad")
    assert any("ONLYONE" in str(c) for c in prepared.uns["de_by_abs_change"])


def test_duplicate_var_names_refused(pert_raw, tmp_path) -> None:
    """Defect 8: duplicate var_names were merged onto one token silently."""
    import anndata as ad

    a = ad.read_h5ad(pert_raw)
    names = a.var_names.tolist()
    names[1] = names[0]
    a.var_names = names
    bad = tmp_path / "dup.h5ad"
    a.write_h5ad(bad)
    res = _invoke(["perturb", "prepare", str(bad), "--out", str(tmp_path / "o.h5ad")])
    assert res.exit_code == 2 and "duplicate var_names" in res.output


def test_evaluate_n_ctrl_zero_is_refused_like_predict(tmp_path) -> None:
    """Defect 10: evaluate --n-ctrl 0 silently meant the default while predict rejects 0."""
    res = _invoke(["perturb", "evaluate", str(tmp_path), "--n-ctrl", "0"])
    assert isinstance(res.exception, InputError)
    assert "--n-ctrl must be >= 1, got 0" in str(res.exception)


def test_integrate_out_that_is_a_file_is_refused(tmp_path) -> None:
    """Defect 9: integrate --out pointing at an existing file gave a traceback."""
    from celltune.tasks.integration import open_run_dir, resolve_config

    f = tmp_path / "taken.txt"
    f.write_text("keep")
    with pytest.raises(InputError, match="is an existing file"):
        open_run_dir(resolve_config({"data": {"batch_key": "batch"}}), f, False)
    assert f.read_text() == "keep"


def test_write_h5ad_on_full_disk_is_one_message(kang_stim_path, tmp_path) -> None:
    """Defect 7: preprocess/embed segfaulted inside h5py on a full disk, leaving temp files."""
    import anndata as ad

    from celltune.data.io import write_h5ad

    mnt = _tiny_fs(tmp_path)
    try:
        a = ad.read_h5ad(kang_stim_path)
        with pytest.raises(CelltuneError, match=r"not enough space to write .*MB needed"):
            write_h5ad(a, mnt / "out.h5ad")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_failed_resume_leaves_config_yaml(tmp_path) -> None:
    """Defect 4: a refused --resume must not have rewritten config.yaml first."""
    from celltune.tasks.config import dump_config
    from celltune.tasks.integration import open_run_dir, resolve_config

    out = tmp_path / "run"
    out.mkdir()
    first = resolve_config({"data": {"batch_key": "batch"}, "train": {"seed": 0}})
    dump_config(first, out / "config.yaml")
    (out / "checkpoint.pt").write_bytes(b"x")
    before = (out / "config.yaml").read_bytes()
    other = resolve_config({"data": {"batch_key": "batch"}, "train": {"seed": 1}})
    with pytest.raises(InputError, match="differ from the checkpointed run"):
        open_run_dir(other, out, True)
    assert (out / "config.yaml").read_bytes() == before
    open_run_dir(first, out, True)  # the original command is still accepted


def test_stats_refuses_duplicate_var_names(pert_raw, tmp_path) -> None:
    """Defect 8: stats crashed on duplicate var_names."""
    import anndata as ad

    a = ad.read_h5ad(pert_raw)
    names = a.var_names.tolist()
    names[1] = names[0]
    a.var_names = names
    bad = tmp_path / "dup.h5ad"
    a.write_h5ad(bad)
    res = _invoke(["stats", str(bad), "--out", str(tmp_path / "st")])
    assert res.exit_code == 2 and "duplicate var_names" in res.output
    assert not (tmp_path / "st" / "stats.json").exists()
