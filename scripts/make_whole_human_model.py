"""Write a model directory shaped like scGPT's published whole-human model, random weights.

Why: tests and benchmarks need the real scale (d_model 512, 12 layers, 8 heads, d_hid 512,
a vocabulary of ~48k genes, ~51 M parameters) and the published checkpoint's file layout
(scGPT's ``args.json`` keys, flash-attention weight names ``self_attn.Wqkv.*``) without
downloading or committing 200 MB of weights. The directory is generated on demand:

    python scripts/make_whole_human_model.py /tmp/whole_human
    python scripts/make_whole_human_model.py /tmp/wh_small --nlayers 1 --vocab-size 2000

The gene list is scGPT's default gene vocabulary (48,292 symbols), read from the
``scgpt`` wheel, looked for in this order: ``--scgpt-wheel PATH``, an installed ``scgpt``
package, ``pip download scgpt==0.2.4 --no-deps`` (skipped with ``--offline``). Only the
JSON data file is read; no scGPT code is imported or copied. Without it the vocabulary is
synthetic (``GENE00000`` ...) of the same size, and ``celltune_note.json`` says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCGPT_VERSION = "0.2.4"
VOCAB_MEMBER = "scgpt/tokenizer/default_gene_vocab.json"
N_GENES = 48_292  # genes in scGPT's default_gene_vocab.json
SPECIALS = ("<pad>", "<cls>", "<eoc>")


def _vocab_from_wheel(wheel: Path) -> dict[str, int]:
    """scGPT's default gene vocabulary from a wheel file (a zip; the JSON is read as data)."""
    with zipfile.ZipFile(wheel) as z:
        return json.loads(z.read(VOCAB_MEMBER))


def _installed_vocab() -> Path | None:
    """The vocabulary file of an installed ``scgpt`` (found without importing scgpt)."""
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    path = path / "default_gene_vocab.json"
    return path if path.is_file() else None


def _download_wheel(dest: Path) -> Path | None:
    """``pip download scgpt --no-deps`` into ``dest``; None when offline or it fails."""
    cmd = [sys.executable, "-m", "pip", "download", f"scgpt=={SCGPT_VERSION}", "--no-deps"]
    try:
        subprocess.run([*cmd, "-d", str(dest), "-q"], check=True, timeout=180, capture_output=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return next(dest.glob("scgpt-*.whl"), None)


def gene_list(wheel: Path | None, offline: bool) -> tuple[list[str], str]:
    """(genes in vocabulary-id order, where they came from)."""
    mapping: dict[str, int] | None = None
    source = ""
    if wheel is not None:
        mapping, source = _vocab_from_wheel(wheel), f"{wheel.name}:{VOCAB_MEMBER}"
    elif (installed := _installed_vocab()) is not None:
        mapping, source = json.loads(installed.read_text()), str(installed)
    elif not offline:
        with tempfile.TemporaryDirectory() as tmp:
            got = _download_wheel(Path(tmp))
            if got is not None:
                mapping, source = _vocab_from_wheel(got), f"{got.name}:{VOCAB_MEMBER}"
    if mapping is None:
        genes = [f"GENE{i:05d}" for i in range(N_GENES)]
        return genes, (
            f"synthetic: the scgpt wheel was not available, so {N_GENES:,} placeholder "
            "names GENE00000... stand in for scGPT's default gene vocabulary (real data "
            "will match no gene)"
        )
    genes = [g for g, _ in sorted(mapping.items(), key=lambda kv: kv[1]) if g not in SPECIALS]
    return genes, source


def scgpt_args(d_model: int, nhead: int, d_hid: int, nlayers: int) -> dict[str, Any]:
    """``args.json`` with the key set of scGPT's published pretraining runs. The sizes are
    the whole-human model's (or the reduced ones asked for); the other values describe
    the pretraining run and are informational (celltune reads sizes, dropout, pad value)."""
    return {
        "data_source": "random weights (celltune scripts/make_whole_human_model.py)",
        "save_dir": ".",
        "load_model": None,
        "n_hvg": None,
        "valid_size_or_ratio": 0.003,
        "dist_backend": "nccl",
        "grad_accu_steps": 1,
        "pad_token": "<pad>",
        "input_style": "binned",
        "input_emb_style": "continuous",
        "n_bins": 51,
        "max_seq_len": 1200,
        "training_tasks": "both",
        "dist_url": None,
        "mask_ratio": [0.25, 0.5, 0.75],
        "trunc_by_sample": True,
        "vocab_path": "vocab.json",
        "rank": 0,
        "batch_size": 32,
        "eval_batch_size": 64,
        "epochs": 6,
        "lr": 0.0001,
        "scheduler_interval": 100,
        "scheduler_factor": 0.99,
        "warmup_ratio_or_step": 10000.0,
        "no_cls": True,
        "no_cce": True,
        "fp16": True,
        "fast_transformer": True,
        "nlayers": nlayers,
        "nheads": nhead,
        "embsize": d_model,
        "d_hid": d_hid,
        "dropout": 0.2,
        "n_layers_cls": 3,
        "log_interval": 100,
        "save_interval": 1000,
        "mask_value": -1,
        "pad_value": -2,
        "USE_CLS": False,
        "USE_CCE": False,
        "MVC": True,
        "USE_GENERATIVE_TRAINING": False,
        "world_size": 1,
        "distributed": False,
        "local_rank": 0,
        "gpu": 0,
    }


def flash_names(state: dict[str, Any]) -> dict[str, Any]:
    """PyTorch's ``self_attn.in_proj_*`` as flash-attention's ``self_attn.Wqkv.*`` (same
    [q; k; v] packing), the names published scGPT checkpoints carry."""
    out = {}
    for key, value in state.items():
        for part in ("weight", "bias"):
            key = key.replace(f"self_attn.in_proj_{part}", f"self_attn.Wqkv.{part}")
        out[key] = value.detach().contiguous()
    return out


def make_model_dir(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write ``args.json``, ``vocab.json``, ``best_model.pt`` and ``celltune_note.json``."""
    import torch

    from celltune.model.config import ModelConfig
    from celltune.model.model import CellTransformer

    genes, source = gene_list(args.scgpt_wheel, args.offline)
    if args.vocab_size is not None:
        genes = genes[: args.vocab_size]
    vocab = {g: i for i, g in enumerate(genes)}
    vocab.update({tok: len(genes) + i for i, tok in enumerate(SPECIALS)})
    torch.manual_seed(args.seed)
    config = ModelConfig(
        ntoken=len(vocab),
        d_model=args.d_model,
        nhead=args.nhead,
        d_hid=args.d_hid,
        nlayers=args.nlayers,
        nlayers_cls=3,
        dropout=0.2,
        pad_id=vocab["<pad>"],
        pad_value=-2,
        do_mvc=True,
        explicit_zero_prob=True,
    )
    model = CellTransformer(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(
        json.dumps(scgpt_args(args.d_model, args.nhead, args.d_hid, args.nlayers), indent=2)
    )
    (out / "vocab.json").write_text(json.dumps(vocab))
    torch.save(flash_names(model.state_dict()), out / "best_model.pt")
    note = {
        "what": "random weights in the layout of scGPT's whole-human model; not a trained model",
        "vocabulary": source,
        "n_genes": len(genes),
        "n_tokens": len(vocab),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": args.seed,
    }
    (out / "celltune_note.json").write_text(json.dumps(note, indent=2))
    return note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="directory to write (created)")
    p.add_argument("--vocab-size", type=int, default=None, help="keep the first N genes")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--nlayers", type=int, default=12)
    p.add_argument("--nhead", type=int, default=8)
    p.add_argument("--d-hid", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scgpt-wheel", type=Path, default=None, help="a downloaded scgpt .whl")
    p.add_argument("--offline", action="store_true", help="never run pip download")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 1:
        p.error("--vocab-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    note = make_model_dir(args.out_dir, args)
    print(
        f"wrote {args.out_dir}: {note['parameters']:,} parameters, {note['n_tokens']:,} "
        f"tokens ({note['n_genes']:,} genes + <pad>/<cls>/<eoc>); vocabulary: "
        f"{note['vocabulary']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
