"""Fault injection, continued (issue 14): the same input gets the same answer in memory and
streamed, a refused ``--resume`` writes nothing, ``perturb``/``stats`` run directories have
an owner and a manifest, existing outputs are not overwritten silently.

Each test failed before its fix; the data is the shipped Kang, Papalexi and Adamson files.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from celltune import files
from celltune.errors import InputError

pytestmark = pytest.mark.faults

TINY = {
    "data": {"batch_key": "batch", "n_hvg": 50, "chunk_size": 64, "buffer_chunks": 2},
    "model": {"d_model": 16, "d_hid": 16, "nlayers": 1, "nhead": 2},
    "tokens": {"max_seq_len": 51},
    "train": {"batch_size": 32, "epochs": 1, "quiet": True, "device": "cpu"},
    "eval": {"umap": False, "baselines": []},
}


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    from celltune.cli.main import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def kang_small(kang_stim_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 cells of the shipped Kang ctrl/stim file (both batches)."""
    full = ad.read_h5ad(kang_stim_path)
    keep = np.sort(np.random.default_rng(0).choice(full.n_obs, 300, replace=False))
    path = tmp_path_factory.mktemp("kang") / "kang300.h5ad"
    full[keep].copy().write_h5ad(path)
    return path


def _with_duplicate(src: Path, dst: Path, axis: str) -> Path:
    a = ad.read_h5ad(src)
    names = list(getattr(a, f"{axis}_names"))
    names[1] = names[0]
    setattr(a, f"{axis}_names", names)
    a.write_h5ad(dst)
    return dst


# -- item 1: integrate --stream validates its input like in-memory integrate ---------------
@pytest.mark.parametrize("axis", ["obs", "var"])
def test_stream_and_memory_refuse_duplicate_names_alike(kang_small, tmp_path, axis) -> None:
    """Defect 8: integrate --stream accepted duplicate obs_names that in-memory refused."""
    from celltune.tasks.integration import integrate, integrate_file

    bad = _with_duplicate(kang_small, tmp_path / "dup.h5ad", axis)
    messages = []
    for run in (
        lambda out: integrate(ad.read_h5ad(bad), TINY, out),
        lambda out: integrate_file(bad, TINY, out),
    ):
        out = tmp_path / f"run{len(messages)}"
        with pytest.raises(InputError, match=rf"1 duplicate {axis}_names") as err:
            run(out)
        messages.append(str(err.value).split(" has ", 1)[1])
        assert not out.exists()  # refused before the run directory was made
    assert messages[0] == messages[1]
    for stream in ([], ["--stream"]):
        res = _invoke(
            ["integrate", str(bad), "--batch-key", "batch", "--out", str(tmp_path / "c"), *stream]
        )
        assert isinstance(res.exception, InputError), res.output
        assert f"duplicate {axis}_names" in str(res.exception)


def test_stats_stream_refuses_duplicate_obs_names(papalexi_path, tmp_path) -> None:
    """Streamed stats did not check cell names (in memory it refuses them)."""
    path = _with_duplicate_adata(ad.read_h5ad(papalexi_path)[:400].copy(), tmp_path / "dup.h5ad")
    res = _invoke(["stats", str(path), "--stream", "--out", str(tmp_path / "st")])
    assert res.exit_code == 2 and "duplicate obs_names" in res.output, res.output
    assert not (tmp_path / "st" / "stats.json").exists()


def _with_duplicate_adata(a: ad.AnnData, dst: Path) -> Path:
    names = list(a.obs_names)
    names[1] = names[0]
    a.obs_names = names
    a.write_h5ad(dst)
    return dst


# -- item 2: a refused --resume (other input) writes nothing --------------------------------
def _snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file's inode, mtime and SHA-256 (a rewrite with equal bytes still shows)."""
    return {
        p.relative_to(directory).as_posix(): (
            p.stat().st_ino,
            p.stat().st_mtime_ns,
            files.sha256_file(p),
        )
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != files.LOCK_NAME
    }


@pytest.mark.parametrize("stream", [False, True])
def test_resume_on_other_input_writes_nothing(kang_stim_path, kang_small, tmp_path, stream):
    """Defect 3/4: the fingerprint check ran after config.yaml was rewritten; and the
    streamed run's fingerprint is checked like the in-memory one."""
    from celltune.tasks.integration import integrate, integrate_file

    full = ad.read_h5ad(kang_stim_path)
    small = ad.read_h5ad(kang_small)
    other_path = tmp_path / "other.h5ad"
    rest = np.flatnonzero(~full.obs_names.isin(small.obs_names))
    full[np.sort(np.random.default_rng(1).choice(rest, 300, replace=False))].copy().write_h5ad(
        other_path
    )

    def run(path: Path, resume: bool):
        if stream:
            return integrate_file(path, TINY, out, resume=resume)
        return integrate(ad.read_h5ad(path), TINY, out, resume=resume)

    out = tmp_path / "run"
    run(kang_small, False)
    before = _snapshot(out)
    assert "checkpoint.pt" in before and "config.yaml" in before
    with pytest.raises(InputError, match=r"input differs from the checkpointed run's .*obs_names"):
        run(other_path, True)
    assert _snapshot(out) == before


# -- items 3, 4, 6: perturb run directories: lock, manifest, no silent overwrite ------------
def _holder(directory: Path) -> subprocess.Popen:
    """A live process that owns ``directory``'s lock (as a concurrent run would)."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (directory / files.LOCK_NAME).write_text(
        json.dumps({"pid": holder.pid, "host": socket.gethostname()})
    )
    return holder


@pytest.fixture(scope="module")
def adamson_run(adamson_mini_path, tmp_path_factory) -> Path:
    """prepare → train (1 tiny epoch) on the shipped Adamson mini file; two prepared files."""
    from celltune.data.gears import prepare_perturbation_data, write_prepared
    from celltune.tasks.perturbation import PerturbConfig, train_perturbation_model

    root = tmp_path_factory.mktemp("adamson")
    raw = ad.read_h5ad(adamson_mini_path)
    for seed, name in ((1, "data.h5ad"), (2, "other.h5ad")):
        prepared = prepare_perturbation_data(raw, data_is_raw=False, split="simulation", seed=seed)
        write_prepared(prepared, root / name)
    cfg = PerturbConfig()
    cfg.model.d_model = cfg.model.d_hid = 16
    cfg.model.nhead, cfg.model.nlayers = 2, 1
    cfg.data.n_eval_ctrl, cfg.data.control_pool = 20, 40
    cfg.train = cfg.train.replace(epochs=1, batch_size=32, quiet=True, device="cpu")
    train_perturbation_model(root / "data.h5ad", root / "run", cfg)
    return root / "run"


def test_perturb_train_writes_manifest_and_refuses_a_locked_dir(adamson_run, tmp_path):
    """Item 3: perturb train had no lock and no manifest."""
    from celltune.tasks.perturbation import train_perturbation_model

    assert not (adamson_run / files.LOCK_NAME).exists()  # released after the run
    manifest = json.loads((adamson_run / files.MANIFEST_NAME).read_text())
    assert {"config.yaml", "controls.h5ad", "run.json", "model/best_model.pt"} <= set(
        manifest["files"]
    )
    assert manifest["runs"]["perturb train"]["inputs"]["data"]["path"].endswith("data.h5ad")
    files.verify_manifest(adamson_run)
    busy = tmp_path / "busy"
    busy.mkdir()
    holder = _holder(busy)
    try:
        with pytest.raises(InputError, match="in use by another celltune run"):
            train_perturbation_model(adamson_run.parent / "data.h5ad", busy)
        assert sorted(p.name for p in busy.iterdir()) == [files.LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_predict_refuses_a_run_in_use_and_a_directory_out(adamson_run, tmp_path) -> None:
    """Items 3 and 6: predict read a run still being written; --out DIR gave a traceback."""
    args = ["perturb", "predict", str(adamson_run), "-p", "HSPA5", "--n-ctrl", "5"]
    res = _invoke([*args, "--out", str(tmp_path)])
    assert isinstance(res.exception, InputError), res.output
    assert "is an existing directory" in str(res.exception)
    res = _invoke([*args, "--out", str(adamson_run / "run.json")])
    assert "is the input file" in str(res.exception)
    holder = _holder(adamson_run)
    try:
        res = _invoke([*args, "--out", str(tmp_path / "p.csv")])
        assert "in use by another celltune run" in str(res.exception)
        assert not (tmp_path / "p.csv").exists()
    finally:
        holder.kill()
        holder.wait()
        (adamson_run / files.LOCK_NAME).unlink()
    res = _invoke([*args, "--out", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_evaluate_other_data_needs_overwrite(adamson_run) -> None:
    """Item 4 (defect 6): evaluate --data <other file> overwrote metrics.json and mixed the
    plots of two data sets."""
    from celltune.report.perturbation_run import evaluate_perturbation_run

    kw = {"n_ctrl": 5, "n_plots": 2, "quiet": True}

    def scores() -> dict:
        m = json.loads((adamson_run / "metrics.json").read_text())
        return {k: v for k, v in m.items() if k != "seconds"}

    evaluate_perturbation_run(adamson_run, **kw)
    first = scores()
    evaluate_perturbation_run(adamson_run, **kw)  # same data: replaced, same answer
    assert scores() == first
    first_sha = files.sha256_file(adamson_run / "metrics.json")
    other = adamson_run.parent / "other.h5ad"
    with pytest.raises(InputError, match=r"already holds the outputs of .*--overwrite"):
        evaluate_perturbation_run(adamson_run, data=other, **kw)
    assert files.sha256_file(adamson_run / "metrics.json") == first_sha
    stray = adamson_run / "perturbation_de_STALE.png"
    stray.write_bytes(b"old plot")
    m = evaluate_perturbation_run(adamson_run, data=other, overwrite=True, **kw)
    assert m["data"] == str(other) and not stray.exists()
    record = json.loads((adamson_run / files.MANIFEST_NAME).read_text())["runs"]
    assert record["perturb evaluate"]["inputs"]["data"]["path"] == str(other.resolve())
    assert "perturb train" in record
    files.verify_manifest(adamson_run)


# -- items 3, 4, 5: stats ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def papalexi_small(papalexi_path, tmp_path_factory) -> Path:
    full = ad.read_h5ad(papalexi_path)
    keep = np.sort(np.random.default_rng(0).choice(full.n_obs, 1500, replace=False))
    path = tmp_path_factory.mktemp("stats") / "p.h5ad"
    full[keep].copy().write_h5ad(path)
    return path


def test_stats_lock_manifest_and_overwrite(papalexi_small, kang_stim_path, tmp_path) -> None:
    """Items 3 and 4: stats had no lock or manifest and replaced another input's files."""
    out = tmp_path / "st"
    args = ["stats", str(papalexi_small), "--out", str(out), "--methods", "t-test"]
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / files.MANIFEST_NAME).read_text())
    assert "stats.json" in manifest["files"] and not (out / files.LOCK_NAME).exists()
    files.verify_manifest(out)
    assert _invoke(args).exit_code == 0  # the same input again: replaced
    other = tmp_path / "other.h5ad"
    other.write_bytes(papalexi_small.read_bytes())
    before = files.sha256_file(out / "stats.json")
    res = _invoke(["stats", str(other), "--out", str(out), "--methods", "t-test"])
    assert res.exit_code == 2 and "--overwrite" in res.output, res.output
    assert files.sha256_file(out / "stats.json") == before
    res = _invoke(["stats", str(other), "--out", str(out), "--methods", "t-test", "--overwrite"])
    assert res.exit_code == 0, res.output
    holder = _holder(out)
    try:
        res = _invoke([*args, "--overwrite"])
        assert res.exit_code == 2 and "in use by another celltune run" in res.output
    finally:
        holder.kill()
        holder.wait()


def test_stats_on_control_cells_only_is_one_message(papalexi_small, tmp_path) -> None:
    """Item 5 (defect 9): stats on control cells only gave a KeyError traceback."""
    a = ad.read_h5ad(papalexi_small)
    ctrl = tmp_path / "ctrl.h5ad"
    a[a.obs["condition"].astype(str) == "ctrl"].copy().write_h5ad(ctrl)
    for stream in ([], ["--stream"]):
        res = _invoke(["stats", str(ctrl), "--out", str(tmp_path / "st"), *stream])
        assert res.exit_code == 2, res.output
        assert "only control cells" in res.output
        assert not (tmp_path / "st").exists()  # refused before writing: no directory left


# -- item 7: a backed AnnData ---------------------------------------------------------------
def test_integrate_backed_anndata_fails_at_the_start_or_streams(kang_small, tmp_path) -> None:
    """Item 7 (defect 9): integrate on a backed AnnData failed only after training."""
    from celltune.tasks.integration import integrate

    backed = ad.read_h5ad(kang_small, backed="r")
    with pytest.raises(InputError, match=r"backed AnnData .*to_memory"):
        integrate(backed, TINY, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    streamed = {**TINY, "data": {**TINY["data"], "stream": True}}
    res = integrate(backed, streamed, tmp_path / "run2")
    assert res.adata.n_obs == backed.n_obs and (tmp_path / "run2" / "integrated.h5ad").is_file()
    backed.file.close()


# -- item 8: --allow-partial on embed and integrate -----------------------------------------
def test_allow_partial_on_embed_and_integrate(fixtures_dir, kang_small, tmp_path) -> None:
    """Item 8: only `model inspect` had --allow-partial; embed/integrate could not load a
    deliberately partial directory."""
    import shutil

    import torch

    from celltune.errors import CheckpointError
    from celltune.tasks.integration import embed, integrate

    d = tmp_path / "m"
    shutil.copytree(
        fixtures_dir / "fixture_integration", d, ignore=shutil.ignore_patterns("golden")
    )
    for p in d.iterdir():
        p.chmod(0o644)
    (d / "model.safetensors").unlink(missing_ok=True)
    sd = torch.load(d / "best_model.pt", weights_only=True)
    torch.save({k: v for k, v in sd.items() if k.startswith("encoder.")}, d / "best_model.pt")
    adata = ad.read_h5ad(kang_small)
    with pytest.raises(CheckpointError, match="--allow-partial"):
        embed(adata, d, quiet=True)
    out = embed(adata, d, quiet=True, allow_partial=True)
    assert out.obsm["X_celltune"].shape[0] == adata.n_obs
    res = _invoke(["embed", str(kang_small), "--model", str(d), "--out", str(tmp_path / "e.h5ad")])
    assert isinstance(res.exception, CheckpointError)
    res = _invoke(
        ["embed", str(kang_small), "--model", str(d), "--out", str(tmp_path / "e.h5ad"),
         "--allow-partial", "--device", "cpu"]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = {**TINY, "model": {"pretrained": str(d)}}
    with pytest.raises(CheckpointError, match="--allow-partial"):
        integrate(adata, cfg, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
    cfg["model"]["allow_partial"] = True
    assert integrate(adata, cfg, None).model is not None
