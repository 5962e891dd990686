"""Model directories in scGPT's format: ``args.json`` + ``vocab.json`` + weights.

Reading never executes pickled code: ``.pt`` files go through
``torch.load(weights_only=True)`` and ``.safetensors`` through safetensors. Published
scGPT checkpoints name attention weights after flash-attn (``self_attn.Wqkv.*``, at times
under ``self_attn._impl.``); they are renamed to PyTorch's ``in_proj_*`` (same [q; k; v]
packing) on read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from celltune.errors import CheckpointError, InputError
from celltune.files import atomic_dir, verify_manifest, write_json_atomic, write_manifest
from celltune.model.config import ModelConfig
from celltune.model.model import CellTransformer

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "best_model.pt")
#: what peft's ``save_pretrained`` writes for a LoRA adapter (low-rank deltas, no model)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")


@dataclasses.dataclass
class LoadReport:
    """What a weight load did: loaded keys, shape mismatches, extra and missing keys."""

    loaded: list[str] = dataclasses.field(default_factory=list)
    skipped_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list
    )
    unexpected: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: counts plus the first few skipped names."""
        text = (
            f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped_shape)} "
            f"(shape mismatch), {len(self.unexpected)} unexpected, {len(self.missing)} left "
            "at initialisation"
        )
        if self.skipped_shape:
            text += "; shape mismatch: " + ", ".join(
                f"{k} {tuple(a)}≠{tuple(b)}" for k, a, b in self.skipped_shape[:3]
            )
        return text


def normalize_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map flash-attn / DDP names to celltune's (= PyTorch's) names."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        k = key[len("module.") :] if key.startswith("module.") else key
        k = k.replace("self_attn._impl.", "self_attn.")
        k = re.sub(r"self_attn\.Wqkv\.(weight|bias)$", r"self_attn.in_proj_\1", k)
        out[k] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a weight file (``.safetensors`` or a PyTorch ``.pt``) without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist; check the model directory")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from err
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except (
            pickle.UnpicklingError,
            RuntimeError,
            AttributeError,
            EOFError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            OSError,
            UnicodeDecodeError,
        ) as err:
            raise CheckpointError(
                f"{path} cannot be read as plain tensors (it needs pickled code or is not a "
                "PyTorch file), and celltune never unpickles code. Re-save it from a trusted "
                "session with torch.save(model.state_dict(), path) or as model.safetensors"
            ) from err
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = raw.get(wrapper)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, Tensor) for v in inner.values())
            ):
                raw = inner
                break
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise CheckpointError(
            f"{path} does not hold a state_dict (a mapping of names to tensors); save "
            "model.state_dict(), not the model object"
        )
    return check_tensors(_refuse_lora_keys(normalize_keys(raw), path), path)


def _refuse_lora_keys(state_dict: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Un-merged LoRA weights (``lora_A`` / ``base_layer`` names) are not a scGPT model."""
    lora = [k for k in state_dict if ".lora_" in k or ".base_layer." in k]
    if lora:
        raise CheckpointError(
            f"{path} holds un-merged LoRA adapter weights ({len(lora)} tensors, e.g. "
            f"{lora[0]}), not a plain model: pass the model directory the run saved (celltune "
            "merges LoRA adapters into the weights when it saves), or merge them with "
            "celltune.model.finetune.merge_lora before saving"
        )
    return state_dict


def check_not_adapter(root: Path) -> None:
    """Refuse a peft LoRA adapter directory where a full model directory is expected."""
    found = [f for f in ADAPTER_FILES if (root / f).is_file()]
    if found and not any((root / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(
            f"{root} is a LoRA adapter directory ({', '.join(found)}: low-rank deltas, no "
            "model), not a model; pass the model directory the run saved next to it (it "
            "holds the merged weights: args.json, vocab.json, best_model.pt)"
        )


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# A full load must set at least this fraction of the model's parameters (by element count);
# below it the model would be mostly random initialisation.
MIN_COVERAGE = 0.9


def check_tensors(state_dict: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Refuse non-float and non-finite weights; half precision is cast to float32 (noted)."""
    half = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):  # BatchNorm's step counter is an integer
            continue
        if value.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {value.dtype}, not a float type; model "
                "weights are float32/float16/bfloat16: re-save the model's state_dict()"
            )
        if value.dtype in (torch.float16, torch.bfloat16):
            half.append(key)
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{path}: tensor {key!r} holds NaN or inf values; the model diverged or the "
                "file is damaged: use an earlier checkpoint"
            )
    if half:
        logger.warning("%s: %d half-precision tensors cast to float32", path, len(half))
        state_dict = {
            k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
            for k, v in state_dict.items()
        }
    return state_dict


def load_weights(
    model: torch.nn.Module,
    state_dict: Mapping[str, Tensor],
    prefixes: Iterable[str] | None = None,
) -> LoadReport:
    """Load every tensor whose name and shape match; report the rest.

    ``prefixes`` restricts loading to names starting with one of them (e.g. the trunk
    ``["encoder", "value_encoder", "transformer_encoder"]`` for perturbation
    fine-tuning from a pretrained model).
    """
    sd = normalize_keys(state_dict)
    if prefixes:
        pre = tuple(prefixes)
        sd = {k: v for k, v in sd.items() if k.startswith(pre)}
    own = model.state_dict()
    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.skipped_shape.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            to_load[key] = value.to(own[key].dtype)
            report.loaded.append(key)
    report.missing = [k for k in own if k not in to_load]
    model.load_state_dict(to_load, strict=False)
    logger.info("checkpoint: %s", report.summary())
    if report.unexpected:
        logger.info("checkpoint: unexpected keys (ignored): %s", report.unexpected[:10])
    return report


def _read_vocab(path: Path) -> Any:
    """A ``GeneVocab`` when the data layer provides it, else the plain ``{token: id}`` dict."""
    try:
        text = path.read_text(encoding="utf-8")
        mapping = json.loads(text)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read vocabulary {path}: {err}; it must be JSON") from err
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise CheckpointError(f"{path} must be a JSON object {{token: id}} (scGPT's vocab.json)")
    try:
        from celltune.data.vocab import GeneVocab
    except ImportError:  # data layer absent: the plain mapping does the same job here
        return mapping
    try:
        return GeneVocab.from_file(path)
    except InputError as err:
        raise CheckpointError(f"cannot use vocabulary {path}: {err}") from err


def _token_to_id(vocab: Any) -> dict[str, int]:
    if isinstance(vocab, Mapping):
        return dict(vocab)
    mapping = getattr(vocab, "token_to_id", None)
    if mapping is None:
        raise CheckpointError("vocab must be a GeneVocab or a {token: id} mapping")
    return dict(mapping() if callable(mapping) else mapping)


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    prefixes: Iterable[str] | None = None,
    allow_partial: bool = False,
    **overrides: Any,
) -> CellTransformer:
    """Build a ready model (eval mode) from a model directory.

    The architecture comes from ``args.json``, completed from the weight names and
    shapes (and checked against every tensor before the model is built). Weights that set
    less than ``MIN_COVERAGE`` of the parameters are refused unless ``allow_partial`` (or
    ``prefixes``, a deliberate partial load); ``overrides`` set celltune-only options
    (e.g. ``dsbn_mode="first"``, ``attn_dropout=0.2``). The result carries ``.vocab``
    and ``.load_report``.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"model directory {root} does not exist; pass a folder with args.json, "
            "vocab.json and best_model.pt or model.safetensors"
        )
    args_path, vocab_path = root / "args.json", root / "vocab.json"
    check_not_adapter(root)
    for needed in (args_path, vocab_path):
        if not needed.is_file():
            raise CheckpointError(f"{root} has no {needed.name}; a model directory needs it")
    try:
        args = json.loads(args_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{args_path} is not valid JSON: {err}") from err
    if not isinstance(args, dict):
        raise CheckpointError(f"{args_path} must be a JSON object of model settings")
    weight_path = next((root / f for f in WEIGHT_FILES if (root / f).is_file()), None)
    if weight_path is None:
        raise CheckpointError(f"{root} holds no weights ({' or '.join(WEIGHT_FILES)})")
    verify_manifest(root, [weight_path.name, "args.json", "vocab.json"])
    state_dict = read_state_dict(weight_path)
    vocab = _read_vocab(vocab_path)
    mapping = _token_to_id(vocab)
    emb = state_dict.get("encoder.embedding.weight")
    n_vocab = max(mapping.values()) + 1 if mapping else 0
    if emb is not None and emb.shape[0] != n_vocab:
        raise CheckpointError(
            f"vocab.json has {n_vocab} token ids (specials <pad>/<cls>/<eoc> included) but the "
            "checkpoint's gene embedding has "
            f"{emb.shape[0]} rows: the vocabulary does not belong to these weights; use the "
            "vocab.json saved with the model"
        )
    config = ModelConfig.from_args(args, state_dict, vocab=mapping)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    check_shapes(config, state_dict, root)
    model = CellTransformer(config, vocab=vocab)
    report = load_weights(model, state_dict, prefixes=prefixes)
    if not prefixes and (report.skipped_shape or report.unexpected):
        logger.warning("checkpoint %s did not fully match its own args: %s", root, report.summary())
    _check_coverage(model, report, root, partial=allow_partial or bool(prefixes))
    model.load_report = report
    logger.info(
        "loaded %s (%s parameters) from %s", type(model).__name__, model.num_parameters(), root
    )
    return model.to(device).eval()


def check_shapes(config: ModelConfig, state_dict: Mapping[str, Tensor], root: Path) -> None:
    """Compare ``args.json`` sizes with the trunk tensors *before* allocating the model."""
    d, h = config.d_model, config.d_hid
    for i in range(config.nlayers):
        pre = f"transformer_encoder.layers.{i}."
        expect = {
            pre + "linear1.weight": (h, d),
            pre + "linear2.weight": (d, h),
            pre + "self_attn.in_proj_weight": (3 * d, d),
        }
        for key, shape in expect.items():
            if key in state_dict and tuple(state_dict[key].shape) != shape:
                raise CheckpointError(
                    f"{root}/args.json (embsize={d}, d_hid={h}) does not match the weights: "
                    f"{key} has shape {tuple(state_dict[key].shape)}, expected {shape}; fix "
                    "args.json to the sizes the model was trained with"
                )
    n_params = config.ntoken * d + config.nlayers * (4 * d * d + 2 * d * h)
    if not state_dict and n_params > 5e8:
        raise CheckpointError(
            f"{root}/args.json describes a model of about {n_params / 1e6:.0f} M parameters "
            "and there are no weights to check it against; fix args.json"
        )


def _check_coverage(model: torch.nn.Module, report: LoadReport, root: Path, partial: bool) -> None:
    """Refuse a directory whose weights leave most of the model at random initialisation."""
    own = model.state_dict()
    total = sum(v.numel() for v in own.values()) or 1
    loaded = sum(own[k].numel() for k in report.loaded)
    fraction = loaded / total
    if fraction < MIN_COVERAGE and not partial:
        raise CheckpointError(
            f"the weights in {root} set only {fraction:.0%} of the model's parameters "
            f"(at least {MIN_COVERAGE:.0%} needed; {report.summary()}): the rest would be "
            "random. Use the model's own weights, or pass --allow-partial / "
            "allow_partial=True to load what matches"
        )
    if fraction < 1.0:
        logger.warning(
            "partial load from %s (%.0f%% of parameters): %s",
            root,
            100 * fraction,
            report.summary(),
        )


def save_model(model: CellTransformer, path: str | Path, vocab: Any = None) -> Path:
    """Write a model directory readable by scGPT and celltune; every file atomic.

    A model with LoRA adapters is saved with the adapters merged into the weights.

    ``best_model.pt`` is scGPT's format (PyTorch names); ``model.safetensors`` holds the
    same tensors and is what celltune loads first; ``args.json`` carries scGPT's keys plus
    every architecture field so nothing needs to be inferred on reload.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    from celltune.model.finetune import has_lora, merge_lora

    if has_lora(model):  # LoRA runs are saved merged: a plain scGPT directory
        model = merge_lora(copy.deepcopy(model))
    vocab = model.vocab if vocab is None else vocab
    if vocab is None:
        raise CheckpointError("save_model needs the vocabulary (pass vocab= or set model.vocab)")
    mapping = _token_to_id(vocab)
    n_vocab = max(mapping.values()) + 1 if mapping else 0
    if n_vocab != model.config.ntoken:
        raise CheckpointError(
            f"the vocabulary has {n_vocab} token ids but the model {model.config.ntoken}; "
            "save with the vocabulary the model was built from"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    keep = {p.name: p for p in root.iterdir() if p.is_file()} if root.is_dir() else {}
    # The whole directory is built aside and swapped in as one unit: a kill leaves the old
    # directory or the new one, never best_model.pt and model.safetensors that disagree.
    with atomic_dir(root) as tmp:
        for name, p in keep.items():  # files other writers put there (celltune_task.json)
            if name not in ("args.json", "vocab.json", "manifest.json", *WEIGHT_FILES):
                shutil.copy2(p, tmp / name)
        write_json_atomic(tmp / "args.json", model.config.to_args())
        write_json_atomic(tmp / "vocab.json", dict(sorted(mapping.items(), key=lambda kv: kv[1])))
        torch.save(state, tmp / "best_model.pt")
        save_file(
            state, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "celltune"}
        )
        write_manifest(tmp)
    logger.info("saved model to %s", root)
    return root
