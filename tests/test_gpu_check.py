"""benchmarks/gpu_check.py on a machine without a GPU: it says so and exits 0.

The CUDA checks themselves need a GPU; here the script runs with CUDA hidden, and the
synthetic batch it trains on is checked on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU is present" in done.stdout
    assert not out.exists()  # nothing measured, nothing written


def test_the_training_batch_is_64_cells_of_1201_tokens() -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    b = gpu_check.make_batch(ntoken=2003, pad_id=2000, cls_id=2001, device="cpu")
    assert b["gene_ids"].shape == (64, 1201) and (b["gene_ids"][:, 0] == 2001).all()
    pad, mask = b["padding_mask"], b["mask"]
    assert pad[::2].any() and not pad[1::2].any()  # every second cell padded
    assert (b["gene_ids"][pad] == 2000).all() and not (mask & pad).any()
    assert not mask[:, 0].any() and 0.3 < mask.float().mean() < 0.45
    assert torch.equal(b["values"][mask], torch.full((int(mask.sum()),), -1.0))
    assert torch.equal(b["values"][~mask], b["target_values"][~mask])
