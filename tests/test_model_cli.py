"""``celltune model inspect``: what a user sees for a model directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from celltune.cli.main import main


def test_inspect_integration_fixture(fixtures_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["model", "inspect", str(fixtures_dir / "fixture_integration")])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "TransformerModel" in out
    assert "41,093" in out
    for head in ("mlm_zero_prob", "mvc (inner product)", "dab", "cls"):
        assert head in out
    assert "DSBN=True, batches=2" in out


def test_inspect_generator_fixture(fixtures_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["model", "inspect", str(fixtures_dir / "fixture_generator")])
    out = capsys.readouterr().out
    assert "TransformerGenerator" in out and "31,491" in out and "perturbation flags" in out


def test_inspect_missing_directory_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["model", "inspect", str(tmp_path / "nope")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Error:" in err and "does not exist" in err and "Traceback" not in err
