"""Every ``--help`` page reads well in an 80-column terminal; ``celltune --version``.

At ``COLUMNS=80`` no line is wider than 80 characters, and every example is an intact
command that can be pasted: a line that starts with ``celltune `` either ends the command
or ends in `` \\`` and is continued by an indented option line, never re-wrapped by rich
mid-token (which would leave a fragment on the next line).
"""

from __future__ import annotations

from importlib import metadata

import pytest
import typer
from typer.testing import CliRunner

from celltune.cli.help import unwrap_prose, wrap_example
from celltune.cli.main import app

runner = CliRunner()


def _command_paths() -> list[list[str]]:
    paths: list[list[str]] = [[]]

    def walk(cmd, prefix: list[str]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


COMMANDS = _command_paths()


def _help(path: list[str], columns: int) -> str:
    res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert res.exit_code == 0, res.output
    return res.output


def example_problems(text: str) -> list[str]:
    """Example lines in a help page that are not intact, pasteable commands."""
    problems = []
    lines = text.splitlines()
    in_cmd = False
    for i, line in enumerate(lines):
        body = line.strip()
        if in_cmd:
            if not line.startswith("       --") and not line.startswith("       -"):
                problems.append(f"line {i}: continuation is not an indented option: {line!r}")
            in_cmd = body.endswith(" \\")
            continue
        if body.startswith("celltune ") and not line.startswith("│"):
            if not line.startswith("   celltune "):
                problems.append(f"line {i}: example not indented as a block: {line!r}")
            in_cmd = body.endswith(" \\")
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not in_cmd and nxt.strip() and not nxt.strip().startswith("celltune "):
                problems.append(f"line {i + 1}: fragment after an example: {nxt!r}")
    return problems


def test_every_command_is_listed():
    names = {" ".join(p) for p in COMMANDS}
    assert {"integrate", "embed", "preprocess", "annotate train", "model inspect"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "celltune")
def test_help_fits_80_columns_and_examples_are_intact(path):
    text = _help(path, 80)
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert not wide, wide
    assert "<bool>" not in text
    assert "{" not in text.splitlines()[1], text.splitlines()[1]  # usage: DATA, not {data}
    assert "[default:" not in text  # one style: "(default X)" in the help text
    assert not example_problems(text), example_problems(text)


@pytest.mark.parametrize("path", [["integrate"], ["preprocess"], ["annotate", "train"]])
def test_help_at_120_columns_keeps_examples_intact(path):
    text = _help(path, 120)
    assert all(len(line) <= 120 for line in text.splitlines())
    assert not example_problems(text)
    assert "celltune " in text


def test_examples_checker_catches_a_broken_example():
    broken = "   celltune integrate kang.h5ad --batch-key batch --out\n runs/kang\n"
    assert example_problems(broken)
    assert not example_problems("   celltune a --b c \\\n       --d e\n\n")


def test_long_example_lines_are_continued_before_an_option():
    line = "  celltune integrate data.h5ad --batch-key batch --label-key cell_type --out runs/x"
    parts = wrap_example(line)
    assert len(parts) == 2 and all(len(p) <= 76 for p in parts)
    assert parts[0].endswith(" \\") and parts[1].lstrip().startswith("--out")
    text = unwrap_prose("Do it.\n\nWrites a\nfile. Example: celltune stats d.h5ad --out s")
    assert "Writes a file." in text and "\n  celltune stats d.h5ad --out s" in text


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"celltune {metadata.version('celltune')}"


def test_device_defaults_to_auto_in_cli_help():
    for path in (["integrate"], ["embed"], ["annotate", "train"], ["annotate", "predict"]):
        text = " ".join(_help(path, 200).split())
        assert "auto | cpu | cuda (default auto)" in text, path
