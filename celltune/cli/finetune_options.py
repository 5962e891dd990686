"""The fine-tuning flags that ``integrate``, ``perturb train`` and ``annotate train`` share.

One declaration, so the three commands spell, document and map them the same way; every
flag is also a config key under ``finetune.`` (``--set finetune.lora_rank=4`` or a
``finetune:`` section in the YAML file). ``None`` = not given: the config value stays.
"""

from __future__ import annotations

from typing import Any

import typer

FINETUNE = typer.Option(
    None, "--finetune", help="Which weights train: full | lora | freeze (default full)."
)
LORA_RANK = typer.Option(None, "--lora-rank", help="With --finetune lora: rank r (default 8).")
LORA_ALPHA = typer.Option(
    None, "--lora-alpha", help="With --finetune lora: alpha; updates scale by alpha/r (default 16)."
)
LORA_TARGETS = typer.Option(
    None,
    "--lora-targets",
    help="With --finetune lora: comma list of linear layers to adapt "
    "(default in_proj,out_proj,linear1,linear2).",
)
FREEZE_LAYERS = typer.Option(
    None,
    "--freeze-layers",
    help="With --finetune freeze: first N transformer layers frozen with the embeddings "
    "(default 0).",
)


def finetune_overrides(
    mode: str | None,
    lora_rank: int | None,
    lora_alpha: float | None,
    lora_targets: str | None,
    freeze_layers: int | None,
) -> dict[str, Any]:
    """The flags as dotted config overrides (``apply_overrides`` skips the ``None`` ones)."""
    return {
        "finetune.mode": mode,
        "finetune.lora_rank": lora_rank,
        "finetune.lora_alpha": lora_alpha,
        "finetune.lora_targets": lora_targets,  # "a,b" is split by the config coercion
        "finetune.freeze_layers": freeze_layers,
    }
