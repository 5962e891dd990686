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


def test_a_value_set_to_scgpt_default_is_kept(tmp_path) -> None:
    """--set, a flag or the YAML naming scGPT's own default still wins over the recipe."""
    spec = IntegrationConfig()
    by_set = resolve_config(apply_overrides(_cfg(), [f"model.d_model={spec.model.d_model}"]))
    assert by_set.model.d_model == spec.model.d_model != SCRATCH["model.d_model"]
    assert by_set.model.nlayers == SCRATCH["model.nlayers"]  # the rest of the recipe applies
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"model:\n  dropout: {spec.model.dropout}\ndata:\n  batch_key: batch\n")
    by_yaml = resolve_config(IntegrationConfig.load(yaml_file))
    assert by_yaml.model.dropout == spec.model.dropout != SCRATCH["model.dropout"]
    assert by_yaml.model.d_model == SCRATCH["model.d_model"]
    by_flag = resolve_config(_cfg(**{"train.lr": spec.train.lr}))
    assert by_flag.train.lr == spec.train.lr != SCRATCH["train.lr"]
    # a deep copy (what resolve_config makes) remembers what was set
    import copy

    assert copy.deepcopy(by_set).model.d_model == spec.model.d_model
