"""Model hyper-parameters and their mapping to/from scGPT's ``args.json``.

Published scGPT checkpoints ship an ``args.json`` that only carries the trunk sizes
(``embsize``, ``nheads``, ``d_hid``, ``nlayers``, ``n_layers_cls``); which heads and
encoders exist is only visible in the weights. :meth:`ModelConfig.from_args` therefore
reads the sizes from ``args.json`` and infers everything else from the parameter names
and shapes, so a user never has to guess the constructor arguments of a checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from celltune.errors import CheckpointError, InputError

INPUT_EMB_STYLES = ("continuous", "category", "scaling")
CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")
MVC_STYLES = ("inner product", "concat query", "sum query")
DSBN_MODES = ("per_cell", "first")
DSBN_UNSEEN = ("pooled", "own")
DECODERS = ("mlp", "affine")

# args.json keys that scGPT's own loaders require; nothing else can stand in for them.
REQUIRED_ARGS = ("embsize", "nheads", "d_hid", "nlayers")


@dataclasses.dataclass
class ModelConfig:
    """Architecture of a :class:`~celltune.model.model.CellTransformer`.

    Field names follow scGPT's constructor arguments. celltune additions:

    - ``attn_dropout``: dropout on the attention weights. scGPT applies ``dropout``
      there too, but on CPU PyTorch's fused attention kernel only runs with
      ``dropout_p=0``; with attention dropout it falls back to the unfused kernel
      (about 8x slower, seq x seq tensors in memory). Default 0.0 keeps the fused
      path; set it to ``dropout`` to reproduce scGPT's training exactly.
    - ``dsbn_mode``: ``"per_cell"`` (default) normalises every cell with its own
      batch's BatchNorm; ``"first"`` reproduces scGPT, which applies the norm of the
      *first* cell's batch to the whole mini-batch.
    - ``dsbn_unseen``: at inference, cells whose batch label is unknown (``None`` or
      ``>= num_batch_labels``) are normalised with the pooled running statistics of all
      known batches (``"pooled"``) or with their own statistics (``"own"``).
    - ``grad_checkpoint``: recompute each transformer layer's activations in the
      backward pass instead of storing them (about 30% less training memory for a few
      percent more compute); no effect on results or on inference.
    - ``decoder``: ``"mlp"`` (``ExprDecoder``) or ``"affine"`` (scGPT's
      ``AffineExprDecoder`` of the perturbation generator: ``coeff * values + bias``).
    """

    ntoken: int
    d_model: int = 128
    nhead: int = 4
    d_hid: int = 128
    nlayers: int = 4
    nlayers_cls: int = 3
    n_cls: int = 1
    dropout: float = 0.2
    pad_id: int | None = None
    pad_token: str = "<pad>"
    pad_value: float = -2
    input_emb_style: str = "continuous"
    n_input_bins: int = 51
    cell_emb_style: str = "cls"
    do_mvc: bool = True
    mvc_decoder_style: str = "inner product"
    explicit_zero_prob: bool = True
    do_dab: bool = False
    use_batch_labels: bool = False
    num_batch_labels: int = 0
    domain_spec_batchnorm: bool | str = False
    ecs_threshold: float = 0.8
    pre_norm: bool = False
    generator: bool = False
    pert_pad_id: int = 0
    decoder: str = "mlp"
    decoder_activation: str | None = None
    decoder_adaptive_bias: bool = False
    attn_dropout: float = 0.0
    dsbn_mode: str = "per_cell"
    dsbn_unseen: str = "pooled"
    grad_checkpoint: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Reject inconsistent settings early, naming the fix."""

        def bad(msg: str) -> None:
            raise InputError(f"invalid model configuration: {msg}")

        if self.ntoken <= 0:
            bad(f"ntoken must be > 0 (got {self.ntoken}); use the vocabulary size")
        if self.pad_id is None or not 0 <= self.pad_id < self.ntoken:
            bad(f"pad_id {self.pad_id} is not a token id in [0, {self.ntoken}); pass vocab[pad]")
        if self.d_model % self.nhead != 0:
            bad(f"d_model {self.d_model} is not divisible by nhead {self.nhead}")
        if self.input_emb_style not in INPUT_EMB_STYLES:
            bad(f"input_emb_style {self.input_emb_style!r}; choose one of {INPUT_EMB_STYLES}")
        if self.input_emb_style == "category" and self.n_input_bins <= 0:
            bad("input_emb_style 'category' needs n_input_bins > 0")
        if self.cell_emb_style not in CELL_EMB_STYLES:
            bad(f"cell_emb_style {self.cell_emb_style!r}; choose one of {CELL_EMB_STYLES}")
        if self.mvc_decoder_style not in MVC_STYLES:
            bad(f"mvc_decoder_style {self.mvc_decoder_style!r}; choose one of {MVC_STYLES}")
        if self.do_mvc and self.explicit_zero_prob and self.mvc_decoder_style != "inner product":
            bad("explicit_zero_prob with an MVC decoder needs mvc_decoder_style 'inner product'")
        if self.dsbn_mode not in DSBN_MODES:
            bad(f"dsbn_mode {self.dsbn_mode!r}; choose one of {DSBN_MODES}")
        if self.dsbn_unseen not in DSBN_UNSEEN:
            bad(f"dsbn_unseen {self.dsbn_unseen!r}; choose one of {DSBN_UNSEEN}")
        if self.decoder not in DECODERS:
            bad(f"decoder {self.decoder!r}; choose one of {DECODERS}")
        if self.domain_spec_batchnorm not in (False, True, "dsbn", "batchnorm"):
            bad(
                f"domain_spec_batchnorm {self.domain_spec_batchnorm!r}; use False, True, "
                "'dsbn' or 'batchnorm'"
            )
        if (self.use_dsbn or self.use_batch_labels or self.do_dab) and self.num_batch_labels <= 0:
            bad("DSBN, batch labels and DAB need num_batch_labels > 0 (the number of batches)")
        if self.generator and (self.use_batch_labels or self.use_dsbn or self.do_dab):
            bad("the perturbation generator has no batch labels, DSBN or DAB; switch them off")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attn_dropout < 1.0:
            bad("dropout and attn_dropout must lie in [0, 1)")

    @property
    def use_dsbn(self) -> bool:
        """Whether a domain-specific BatchNorm (one per batch) is built."""
        return self.domain_spec_batchnorm is True or self.domain_spec_batchnorm == "dsbn"

    @property
    def mvc_in_dim(self) -> int:
        """Width of the cell vector the MVC decoder sees (cell_emb, ⊕ batch embedding)."""
        return 2 * self.d_model if self.use_batch_labels else self.d_model

    # ------------------------------------------------------------- args.json
    def to_args(self) -> dict[str, Any]:
        """scGPT's ``args.json`` keys plus every celltune architecture field."""
        args: dict[str, Any] = {
            "embsize": self.d_model,
            "nheads": self.nhead,
            "d_hid": self.d_hid,
            "nlayers": self.nlayers,
            "n_layers_cls": self.nlayers_cls,
            "dropout": self.dropout,
            "pad_token": self.pad_token,
            "pad_value": self.pad_value,
            "input_emb_style": self.input_emb_style,
            "n_bins": self.n_input_bins,
            "MVC": self.do_mvc,
            "fast_transformer": False,
        }
        for field in dataclasses.fields(self):
            args[field.name] = getattr(self, field.name)
        return args

    @classmethod
    def from_args(
        cls,
        args: Mapping[str, Any],
        state_dict: Mapping[str, Any] | None = None,
        *,
        vocab: Mapping[str, int] | None = None,
    ) -> ModelConfig:
        """Build a config from ``args.json`` and, for what it lacks, the weights.

        ``args`` keys written by celltune take precedence; scGPT keys come next; heads,
        encoders and their sizes are read off ``state_dict`` names and shapes.
        """
        kw = _sizes_from_args(args)
        sd = dict(state_dict or {})
        keys = set(sd)
        _vocab_size_and_pad(kw, args, sd, vocab)
        _heads_and_encoders(kw, args, sd, keys)

        # celltune's own keys (written by save_model) are authoritative for settings the
        # weights cannot show (pre_norm, attn_dropout, dsbn_mode, ...).
        names = {f.name for f in dataclasses.fields(cls)}
        weight_derived = set(kw) - {"dropout", "pad_value", "pad_token"}
        for key, value in args.items():
            if key in names and key not in ("ntoken",) and (key not in weight_derived or not keys):
                kw[key] = value
        if "ecs_thres" in args and "ecs_threshold" not in args:
            kw["ecs_threshold"] = float(args["ecs_thres"])
        try:
            return cls(**kw)
        except InputError as err:
            raise CheckpointError(f"inconsistent model directory: {err}") from err


def _sizes_from_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The required sizes (checked), pad token, dropout and pad value from ``args.json``."""
    for key in REQUIRED_ARGS:
        if key not in args:
            raise CheckpointError(
                f"args.json lacks the key {key!r} (one of {list(REQUIRED_ARGS)}); add it "
                "with the value the model was trained with"
            )
    _check_arg_types(args)
    kw: dict[str, Any] = {
        "d_model": int(args["embsize"]),
        "nhead": int(args["nheads"]),
        "d_hid": int(args["d_hid"]),
        "nlayers": int(args["nlayers"]),
    }
    kw["pad_token"] = str(args.get("pad_token", "<pad>"))
    if "dropout" in args:
        kw["dropout"] = float(args["dropout"])
    if "pad_value" in args:
        kw["pad_value"] = args["pad_value"]
    return kw


def _vocab_size_and_pad(
    kw: dict[str, Any],
    args: Mapping[str, Any],
    sd: Mapping[str, Any],
    vocab: Mapping[str, int] | None,
) -> None:
    """``ntoken`` and ``pad_id`` into ``kw``: from the weights, then the vocabulary, then args."""
    pad_token = kw["pad_token"]
    emb = tuple(sd["encoder.embedding.weight"].shape) if "encoder.embedding.weight" in sd else None
    if emb is not None:
        kw["ntoken"] = emb[0]
        if emb[1] != kw["d_model"]:
            raise CheckpointError(
                f"args.json says embsize={kw['d_model']} but the gene embedding has width "
                f"{emb[1]}; fix embsize in args.json"
            )
    elif vocab is not None:
        kw["ntoken"] = len(vocab)
    elif "ntoken" in args:
        kw["ntoken"] = int(args["ntoken"])
    else:
        raise CheckpointError("cannot tell the vocabulary size: provide vocab.json")
    if vocab is not None:
        if pad_token not in vocab:
            raise CheckpointError(
                f"the vocabulary has no pad token {pad_token!r}; add it to vocab.json or "
                "set pad_token in args.json"
            )
        kw["pad_id"] = int(vocab[pad_token])
    elif "pad_id" in args:
        kw["pad_id"] = int(args["pad_id"])


def _heads_and_encoders(
    kw: dict[str, Any], args: Mapping[str, Any], sd: Mapping[str, Any], keys: set[str]
) -> None:
    """Heads, encoders and their sizes into ``kw``: read off the weights when there are
    any (the layer count must match ``nlayers``), else from scGPT's args keys."""
    if keys:
        kw.update(_infer_from_weights(sd, keys, kw["d_model"]))
        layer_ids = {
            int(m.group(1))
            for k in keys
            if (m := re.match(r"transformer_encoder\.layers\.(\d+)\.", k))
        }
        if layer_ids and len(layer_ids) != kw["nlayers"]:
            raise CheckpointError(
                f"args.json says nlayers={kw['nlayers']} but the weights hold "
                f"{len(layer_ids)} transformer layers; fix nlayers in args.json"
            )
    elif "n_layers_cls" in args:
        kw["nlayers_cls"] = int(args["n_layers_cls"])
    if "n_layers_cls" in args and "nlayers_cls" not in kw:
        kw["nlayers_cls"] = int(args["n_layers_cls"])
    if "n_bins" in args and kw.get("input_emb_style") != "category":
        kw["n_input_bins"] = int(args["n_bins"])
    if "MVC" in args and not keys:
        kw["do_mvc"] = bool(args["MVC"])


# Upper bounds far above any published model; larger values are typos that would allocate
# terabytes before any tensor shape could contradict them.
_ARG_LIMITS = {"embsize": 65536, "nheads": 1024, "d_hid": 262144, "nlayers": 512}


def _check_arg_types(args: Mapping[str, Any]) -> None:
    """Sizes must be positive integers in range, dropout a number in [0, 1)."""
    for key, top in _ARG_LIMITS.items():
        value = args.get(key)
        if key not in args and key not in REQUIRED_ARGS:
            continue
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= top
        if isinstance(value, float) and value.is_integer():
            ok = 0 < value <= top
        if not ok:
            raise CheckpointError(
                f"args.json {key}={value!r} is not an integer in [1, {top}]; set it to the "
                "value the model was trained with"
            )
    if "dropout" in args:
        value = args["dropout"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise CheckpointError(
                f"args.json dropout={value!r} is not a number in [0, 1); e.g. 0.2"
            )


def _infer_from_weights(sd: Mapping[str, Any], keys: set[str], d_model: int) -> dict[str, Any]:
    """Settings that only the parameter names/shapes reveal (scGPT's args.json omits them)."""
    kw: dict[str, Any] = {}

    def has_prefix(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    generator = "pert_encoder.weight" in keys
    kw["generator"] = generator
    if generator:
        rows = sd["pert_encoder.weight"]
        zero_rows = [i for i in range(rows.shape[0]) if not bool(rows[i].any())]
        kw["pert_pad_id"] = zero_rows[0] if len(zero_rows) == 1 else 0
    kw["decoder"] = "affine" if has_prefix("decoder.coeff_decoder.") else "mlp"
    kw["explicit_zero_prob"] = any(
        k.startswith(("decoder.zero_logit.", "decoder.coeff_decoder.zero_logit."))
        or k.startswith("mvc_decoder.W_zero_logit.")
        for k in keys
    )
    if "value_encoder.linear1.weight" in keys:
        kw["input_emb_style"] = "continuous"
    elif "value_encoder.embedding.weight" in keys:
        kw["input_emb_style"] = "category"
        kw["n_input_bins"] = int(sd["value_encoder.embedding.weight"].shape[0])
    else:
        kw["input_emb_style"] = "scaling"

    num_batches = 0
    if "batch_encoder.embedding.weight" in keys:
        kw["use_batch_labels"] = True
        num_batches = int(sd["batch_encoder.embedding.weight"].shape[0])
    else:
        kw["use_batch_labels"] = False
    dsbn_ids = {int(m.group(1)) for k in keys if (m := re.match(r"dsbn\.bns\.(\d+)\.", k))}
    if dsbn_ids:
        kw["domain_spec_batchnorm"] = True
        num_batches = max(num_batches, len(dsbn_ids))
    elif "bn.running_mean" in keys:
        kw["domain_spec_batchnorm"] = "batchnorm"
    else:
        kw["domain_spec_batchnorm"] = False
    if "grad_reverse_discriminator.out_layer.weight" in keys:
        kw["do_dab"] = True
        num_batches = max(
            num_batches, int(sd["grad_reverse_discriminator.out_layer.weight"].shape[0])
        )
    else:
        kw["do_dab"] = False
    kw["num_batch_labels"] = num_batches

    if "cls_decoder.out_layer.weight" in keys:
        kw["n_cls"] = int(sd["cls_decoder.out_layer.weight"].shape[0])
        n_lin = {
            int(m.group(1))
            for k in keys
            if (m := re.match(r"cls_decoder\._decoder\.(\d+)\.weight", k)) and sd[k].dim() == 2
        }
        kw["nlayers_cls"] = len(n_lin) + 1

    if has_prefix("mvc_decoder."):
        kw["do_mvc"] = True
        if "mvc_decoder.W.weight" in keys:
            kw["mvc_decoder_style"] = "inner product"
        elif "mvc_decoder.fc1.weight" in keys:
            # concat query: fc1 sees [cell ⊕ query]; sum query: fc1 sees cell + query
            fc1_in = int(sd["mvc_decoder.fc1.weight"].shape[1])
            q_out = int(sd["mvc_decoder.gene2query.weight"].shape[0])
            kw["mvc_decoder_style"] = "concat query" if fc1_in > q_out else "sum query"
    else:
        kw["do_mvc"] = False
    return kw
