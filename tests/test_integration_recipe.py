"""Recipes (issue 16): from-scratch runs get the CPU recipe, --pretrained runs scGPT's
settings, and anything the user set wins."""

from __future__ import annotations

import pytest

from celltune.errors import InputError
from celltune.tasks.config import apply_overrides
from celltune.tasks.integration import IntegrationConfig
from celltune.tasks.integration.recipe import SCRATCH, apply_recipe, resolve_recipe
from celltune.tasks.integration.train import resolve_config


def _cfg(**kw: object) -> IntegrationConfig:
    return apply_overrides(IntegrationConfig(), {"data.batch_key": "batch", **kw})


def test_from_scratch_gets_the_recipe_and_user_values_win() -> None:
    cfg = resolve_config(_cfg(**{"model.d_model": 32, "train.lr": 5e-4}))
    assert resolve_recipe(cfg) == "scratch"
    assert cfg.model.d_model == 32 and cfg.train.lr == 5e-4  # set by the user
    assert cfg.tokens.include_zero_gene is False and cfg.objective.gepc_genes == "all"
    assert cfg.train.scheduler == "cosine" and cfg.train.max_steps == SCRATCH["train.max_steps"]
    # resolving again changes nothing (config.yaml of a run reloads to the same run)
    assert apply_recipe(cfg) == {}


def test_pretrained_and_scgpt_recipe_keep_scgpt_settings() -> None:
    spec = IntegrationConfig()
    for cfg in (
        resolve_config(_cfg(**{"model.pretrained": "some/dir"})),
        resolve_config(_cfg(**{"model.recipe": "scgpt"})),
    ):
        assert resolve_recipe(cfg) == "scgpt"
        assert cfg.model == dataclass_replace(spec.model, cfg.model)
        assert cfg.tokens.include_zero_gene is True and cfg.objective.gepc_genes == "input"
        assert (cfg.train.lr, cfg.train.scheduler, cfg.train.max_steps) == (1e-4, "step", None)


def dataclass_replace(spec_model, model):
    """spec's model section with the fields these tests set (pretrained, recipe)."""
    import dataclasses

    return dataclasses.replace(spec_model, pretrained=model.pretrained, recipe=model.recipe)


def test_unknown_recipe_is_refused() -> None:
    with pytest.raises(InputError, match=r"model\.recipe"):
        resolve_config(_cfg(**{"model.recipe": "fast"}))
