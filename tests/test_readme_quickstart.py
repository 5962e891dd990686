"""The README's quick start runs as printed.

The fenced block after the ``<!-- quickstart`` marker in README.md is split into shell
commands and each one is run with bash, verbatim, from a temporary directory laid out like
the repository root (``../shared`` links to the shared data), so its relative ``runs/...``
outputs land in the temporary directory. ``PYTHONPATH`` points at this checkout, so the
``celltune`` on ``PATH`` runs this tree's code.

At CI size: the README's commands take 4-5 minutes on a laptop CPU, more than CI can
spend, so this test **appends size-reducing flags** (``CI_FLAGS`` below: fewer cells,
genes, epochs and control cells) to the end of each command. Everything the README prints
still runs as printed; only the appended flags (later flags win) make the run smaller.
About 80-90 s on a 2-core CPU.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLTUNE_SHARED", ROOT.parent / "shared"))  # as conftest.py

pytestmark = pytest.mark.e2e

MARKER = "<!-- quickstart"

#: subcommand -> flags appended at CI size (see the module docstring)
CI_FLAGS = {
    "integrate": (
        "--epochs 1 --set data.max_cells=200 --eval-cells 200 --n-hvg 100 --max-seq-len 32 -q"
    ),
    "perturb prepare": "",
    "perturb train": "--set data.max_cells_per_condition=10 -q",
    "perturb evaluate": "--n-ctrl 20 -q",
    "stats": "--methods t-test",
}


def quickstart_commands(readme: str) -> list[str]:
    """The shell commands of the quick-start block, continuation lines joined."""
    start = readme.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", readme[start:], flags=re.S)
    assert block, "no ```bash block after the quickstart marker in README.md"
    joined = block.group(1).replace("\\\n", " ")
    cmds = [ln.strip() for ln in joined.splitlines()]
    return [c for c in cmds if c and not c.startswith("#")]


def subcommand(cmd: str) -> str:
    words = shlex.split(cmd)
    assert words[0] == "celltune", f"quick-start command does not start with celltune: {cmd}"
    two = " ".join(words[1:3])
    return two if two in CI_FLAGS else words[1]


def test_quickstart_block_is_found_and_covers_the_workflows() -> None:
    cmds = quickstart_commands((ROOT / "README.md").read_text())
    assert [subcommand(c) for c in cmds] == list(CI_FLAGS)


def test_readme_quickstart_runs_as_printed(tmp_path: Path) -> None:
    if shutil.which("celltune") is None:
        pytest.skip("the celltune console script is not installed (run scripts/setup.sh)")
    cmds = quickstart_commands((ROOT / "README.md").read_text())
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in cmds:
        full = f"{cmd} {CI_FLAGS[subcommand(cmd)]}".strip()
        proc = subprocess.run(
            ["bash", "-c", full], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"{full}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    qs = work / "runs" / "quickstart"
    for rel in [
        "integrate/report.html",
        "integrate/integrated.h5ad",
        "integrate/metrics.json",
        "papalexi.h5ad",
        "perturb/report.html",
        "perturb/metrics.json",
        "stats/stats.json",
    ]:
        assert (qs / rel).is_file(), f"quick start did not write {rel}"
