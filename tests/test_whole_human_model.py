"""scripts/make_whole_human_model.py: a reduced whole-human-shaped directory loads in celltune.

The full size (12 layers, 48,292 genes, ~46 M parameters, 185 MB) is what benchmarks use;
the test builds 1 layer and 2,000 genes with the same widths, heads and file layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from celltune.model import load_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_whole_human_model.py"
#: the trunk keys of scGPT's published args.json that its loaders read
SCGPT_KEYS = {"embsize", "nheads", "d_hid", "nlayers", "n_layers_cls", "dropout", "pad_value"}


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout


def test_reduced_whole_human_model_loads_with_no_missing_keys(tmp_path: Path) -> None:
    out = tmp_path / "wh"
    text = _run(str(out), "--nlayers", "1", "--vocab-size", "2000", "--offline")
    assert "2,003 tokens (2,000 genes" in text
    sd = torch.load(out / "best_model.pt", weights_only=True)
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in sd  # flash-attention names
    assert not any("in_proj" in k for k in sd)
    args = json.loads((out / "args.json").read_text())
    assert set(args) >= SCGPT_KEYS and "d_model" not in args  # scGPT's keys, not celltune's
    assert (args["embsize"], args["nheads"], args["d_hid"], args["nlayers"]) == (512, 8, 512, 1)
    model = load_model(out)
    report = model.load_report
    assert not report.missing and not report.unexpected and not report.skipped_shape
    c = model.config
    assert (c.d_model, c.nhead, c.d_hid, c.nlayers, c.ntoken) == (512, 8, 512, 1, 2003)
    assert c.do_mvc and c.explicit_zero_prob and not c.use_batch_labels
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["<pad>"] == 2000 and vocab["<eoc>"] == 2002
    note = json.loads((out / "celltune_note.json").read_text())
    # --offline: synthetic names, or an installed scgpt package's own vocabulary file
    assert note["vocabulary"].startswith("synthetic") or note["vocabulary"].endswith(
        "default_gene_vocab.json"
    )


def test_gene_names_come_from_the_scgpt_wheel_json(tmp_path: Path) -> None:
    """The wheel is read as a zip: only its vocabulary JSON, ids as stored."""
    wheel = tmp_path / "scgpt-0.2.4-py3-none-any.whl"
    genes = {"A1BG": 1, "CD3D": 0, "STAT1": 2, "<pad>": 3}
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("scgpt/tokenizer/default_gene_vocab.json", json.dumps(genes))
    out = tmp_path / "wh"
    _run(
        str(out), "--nlayers", "1", "--d-model", "64", "--d-hid", "64", "--scgpt-wheel", str(wheel)
    )
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab == {"CD3D": 0, "A1BG": 1, "STAT1": 2, "<pad>": 3, "<cls>": 4, "<eoc>": 5}
    assert load_model(out).config.ntoken == 6
