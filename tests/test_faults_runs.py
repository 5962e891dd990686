"""Fault injection, continued (issue 14): the same input gets the same answer in memory and
streamed, a refused ``--resume`` writes nothing, ``perturb``/``stats`` run directories have
an owner and a manifest, existing outputs are not overwritten silently.

Each test failed before its fix; the data is the shipped Kang and Papalexi files.
"""

from __future__ import annotations

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
