"""``celltune preprocess`` end to end on a real Kang file, plus its error paths."""

from __future__ import annotations

import re

import anndata as ad
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from celltune.cli.main import app, main
from celltune.errors import InputError

runner = CliRunner()


@pytest.fixture(scope="module")
def small_input(tmp_path_factory, kang_stim_path):
    """Every 3rd cell of the 1,556-cell Kang ctrl/stim file (raw counts)."""
    p = tmp_path_factory.mktemp("cli") / "kang_small.h5ad"
    ad.read_h5ad(kang_stim_path)[::3].copy().write_h5ad(p)
    return p


def test_help_shows_examples():
    res = runner.invoke(app, ["preprocess", "--help"])
    assert res.exit_code == 0
    for text in ("Examples", "--out", "--n-hvg", "--batch-key", "--not-raw", "--config"):
        assert text in res.output
    assert "preprocess" in runner.invoke(app, ["--help"]).output


@pytest.mark.e2e
def test_preprocess_writes_result(small_input, tmp_path):
    out = tmp_path / "pp.h5ad"
    args = ["preprocess", str(small_input), "--out", str(out), "--n-hvg", "300"]
    res = runner.invoke(app, [*args, "--batch-key", "batch", "--n-bins", "21", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "HVGs      300 (seurat_v3, batch_key=batch)" in res.output
    assert f"519 cells × 1,267 genes from {small_input}" in res.output
    r = ad.read_h5ad(out)
    assert r.shape == (519, 300)
    assert {"counts", "X_normed", "X_binned"} <= set(r.layers.keys())
    assert sp.issparse(r.layers["X_binned"]) and r.layers["X_binned"].max() == 20
    params = r.uns["celltune"]["preprocess"]
    assert (params["n_bins"], params["seed"], params["batch_key"]) == (21, 2, "batch")
    import h5py

    with h5py.File(out) as f:  # written gzip-compressed
        assert f["layers/X_binned/data"].compression == "gzip"


@pytest.mark.e2e
def test_config_file_and_cli_override(small_input, tmp_path):
    cfg = tmp_path / "pp.yaml"
    cfg.write_text("preprocess:\n  n_hvg: 200\n  n_bins: 11\n  hvg_flavor: cell_ranger\n")
    out = tmp_path / "pp.h5ad"
    args = ["preprocess", str(small_input), "-o", str(out), "--config", str(cfg)]
    res = runner.invoke(app, [*args, "--n-bins", "31", "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.output == ""
    params = ad.read_h5ad(out).uns["celltune"]["preprocess"]
    assert (params["n_hvg"], params["n_bins"], params["hvg_flavor_used"]) == (
        200,
        31,
        "cell_ranger",
    )


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--batch-key", "donor_id"], r"'donor_id'.*available obs columns.*'batch'"),
        (["--n-hvg", "5000"], r"n_hvg=5,000 but only"),
        (["--layer", "raw"], r"layer 'raw' not found"),
    ],
)
def test_bad_options_fail_without_output(small_input, tmp_path, extra, match):
    out = tmp_path / "pp.h5ad"
    res = runner.invoke(app, ["preprocess", str(small_input), "--out", str(out), *extra])
    assert res.exit_code != 0
    assert isinstance(res.exception, InputError)
    assert re.search(match, str(res.exception))
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


def test_bad_config_key(small_input, tmp_path):
    cfg = tmp_path / "pp.yaml"
    cfg.write_text("n_hvgs: 10\n")
    res = runner.invoke(
        app, ["preprocess", str(small_input), "-o", str(tmp_path / "o.h5ad"), "--config", str(cfg)]
    )
    assert isinstance(res.exception, InputError)
    assert "n_hvgs" in str(res.exception) and "valid options" in str(res.exception)


@pytest.mark.parametrize("kind", ["missing", "not_h5ad"])
def test_main_prints_one_line_error(tmp_path, capsys, kind):
    src = tmp_path / "in.h5ad"
    if kind == "not_h5ad":
        src.write_text("cell,CD3D\nc1,4\n")
    with pytest.raises(SystemExit) as exc:
        main(["preprocess", str(src), "--out", str(tmp_path / "out.h5ad")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and "\n" not in err
    assert ("not found" if kind == "missing" else "not an .h5ad") in err
    assert not (tmp_path / "out.h5ad").exists()
