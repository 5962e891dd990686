"""Recipes: the settings a from-scratch run gets unless the user chose them.

The dataclass defaults of :class:`IntegrationConfig` are scGPT's integration settings
(SPEC §4): right for fine-tuning a pretrained model, but from scratch on a laptop CPU they
run for hours and give an embedding worse than unintegrated PCA (issue 16's measurements,
``docs/integration-recipe.md``). ``model.recipe`` picks what a run uses:

- ``auto`` (default): ``scratch`` without ``--pretrained``, ``scgpt`` with it;
- ``scratch``: :data:`SCRATCH` — a small model, non-zero genes as tokens, GEPC over every
  gene, warm-up + cosine lr and a budget in optimizer steps;
- ``scgpt``: the defaults as they are (scGPT's settings).

A recipe only replaces values the user did not set: anything in the YAML, a ``--set`` or a
flag wins, even when it equals scGPT's default (``--set model.d_model=128`` keeps 128). A
config built in Python counts values that differ from the defaults as set. The log lists
every value a recipe changed.
"""

from __future__ import annotations

import logging
from typing import Any

from celltune.errors import InputError
from celltune.tasks.config import explicit_keys

logger = logging.getLogger("celltune.tasks.integration")

RECIPES = ("auto", "scratch", "scgpt")

#: The from-scratch CPU recipe (measured in docs/integration-recipe.md).
SCRATCH: dict[str, Any] = {
    "model.d_model": 64,
    "model.d_hid": 64,
    "model.nlayers": 2,
    "model.cell_emb_style": "avg-pool",
    "model.dropout": 0.0,  # with 1,200 steps: +0.10 total at seed 0 (3 seeds: the recipe page)
    "tokens.include_zero_gene": False,
    "tokens.max_seq_len": 601,
    "objective.gepc_genes": "all",
    "train.lr": 1e-3,
    "train.scheduler": "cosine",
    "train.warmup_steps": 50,
    "train.max_steps": 1200,
    "train.epochs": 60,  # a cap only: 200 cells reach it (180 steps), 1,556 cells do not
    "train.patience": None,
}


def _get(cfg: Any, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: Any, key: str, value: Any) -> None:
    section, name = key.split(".")
    part = getattr(cfg, section)
    if section == "train":  # TrainConfig validates on replace
        cfg.train = part.replace(**{name: value})
    else:
        setattr(part, name, value)


def resolve_recipe(cfg: Any) -> str:
    """The recipe a run uses: ``auto`` resolved by whether a model is pretrained."""
    recipe = cfg.model.recipe
    if recipe not in RECIPES:
        raise InputError(f"model.recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if recipe == "auto":
        return "scgpt" if cfg.model.pretrained else "scratch"
    return recipe


def apply_recipe(cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Apply the run's recipe to ``cfg`` in place; returns ``{key: (old, new)}`` changed."""
    recipe = resolve_recipe(cfg)
    if recipe != "scratch":
        return {}
    defaults = type(cfg)()
    chosen = explicit_keys(cfg)
    changed: dict[str, tuple[Any, Any]] = {}
    for key, value in SCRATCH.items():
        now = _get(cfg, key)
        if key not in chosen and now == _get(defaults, key) and now != value:
            _set(cfg, key, value)
            changed[key] = (now, value)
    if changed:
        logger.info(
            "from-scratch recipe (model.recipe=%s): %s; --set model.recipe=scgpt keeps "
            "scGPT's settings",
            cfg.model.recipe,
            ", ".join(f"{k}={v[1]}" for k, v in changed.items()),
        )
    return changed
