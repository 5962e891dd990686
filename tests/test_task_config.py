"""Task configuration: defaults < YAML < overrides, type checks, clear errors, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from celltune.errors import InputError
from celltune.tasks.config import (
    apply_overrides,
    config_to_dict,
    diff_configs,
    dump_config,
    load_config,
    parse_override,
)
from celltune.tasks.integration import IntegrationConfig

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_are_the_spec_defaults() -> None:
    cfg = IntegrationConfig()
    assert (cfg.data.n_hvg, cfg.data.n_bins, cfg.data.valid_fraction) == (1200, 51, 0.1)
    assert (cfg.tokens.mask_ratio, cfg.tokens.mask_value, cfg.tokens.pad_value) == (0.4, -1, -2)
    assert cfg.tokens.include_zero_gene is True
    assert (cfg.model.d_model, cfg.model.d_hid, cfg.model.nlayers, cfg.model.nhead) == (
        128,
        128,
        4,
        4,
    )
    assert cfg.model.dropout == 0.2 and cfg.model.dab and cfg.model.dsbn
    o = cfg.objective
    assert (o.ecs_weight, o.ecs_threshold, o.dab_weight, o.gepc_weight) == (10.0, 0.8, 1.0, 1.0)
    t = cfg.train
    assert (t.epochs, t.lr, t.batch_size, t.gamma, t.grad_clip) == (30, 1e-4, 64, 0.9, 1.0)
    assert t.select_metric == "val/mse" and t.select_mode == "min"
    assert cfg.eval.baselines == ["pca", "harmony", "scvi"]


def test_yaml_partial_sections_keep_the_other_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "data:\n  batch_key: batch\n  n_hvg: 600\ntrain:\n  epochs: 3\n  lr: 1e-3\n",
    )
    cfg = load_config(path, schema=IntegrationConfig)
    assert cfg.data.batch_key == "batch" and cfg.data.n_hvg == 600
    assert cfg.data.n_bins == 51
    assert cfg.train.epochs == 3
    # PyYAML reads "1e-3" (no dot) as a string; the loader turns it into the float.
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    # The task's own training defaults (not TrainConfig's) survive a partial section.
    assert cfg.train.select_metric == "val/mse" and cfg.train.patience == 5


def test_overrides_win_over_yaml_and_skip_none(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  epochs: 3\n  batch_size: 16\n")
    cfg = load_config(
        path,
        {"train.epochs": 7, "train.batch_size": None, "model.dab": False},
        schema=IntegrationConfig,
    )
    assert cfg.train.epochs == 7  # override beats the YAML
    assert cfg.train.batch_size == 16  # None = flag not given: the YAML value stays
    assert cfg.model.dab is False
    cfg2 = apply_overrides(cfg, ["tokens.include_zero_gene=false", "eval.baselines=pca,harmony"])
    assert cfg2.tokens.include_zero_gene is False
    assert cfg2.eval.baselines == ["pca", "harmony"]
    assert cfg.tokens.include_zero_gene is True  # the input config is not modified


def test_parse_override() -> None:
    assert parse_override("train.epochs=5") == ("train.epochs", 5)
    assert parse_override("data.label_key=cell_type") == ("data.label_key", "cell_type")
    assert parse_override("data.max_cells=null") == ("data.max_cells", None)
    with pytest.raises(InputError, match=r"section\.key=value"):
        parse_override("train.epochs")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("train:\n  epoch: 3\n", r"unknown config key 'train.epoch'.*did you mean 'train.epochs'"),
        ("trian:\n  epochs: 3\n", r"unknown config key 'trian'.*did you mean 'train'"),
        ("train:\n  epochs: three\n", r"'train.epochs' must be an integer"),
        ("model:\n  dab: maybe\n", r"'model.dab' must be true or false"),
        ("data: 5\n", r"'data' is a section"),
        ("- a\n- b\n", r"must hold a mapping"),
        ("train: [unclosed\n", r"not valid YAML"),
        ("train:\n  amp: fp8\n", r"'train.amp' must be one of"),
        ("train:\n  epochs: 0\n", r"epochs must be a positive integer"),
    ],
)
def test_bad_yaml_gives_a_clear_input_error(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        load_config(_write(tmp_path, text), schema=IntegrationConfig)


def test_bad_overrides_name_the_key() -> None:
    with pytest.raises(InputError, match=r"unknown config key 'model.d_modle'.*'d_model'"):
        load_config(None, {"model.d_modle": 64}, schema=IntegrationConfig)
    with pytest.raises(InputError, match="is a section"):
        load_config(None, ["train=5"], schema=IntegrationConfig)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", schema=IntegrationConfig)


def test_dump_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        {"data.batch_key": "batch", "train.lr": 3e-4, "eval.baselines": ["pca"]},
        schema=IntegrationConfig,
    )
    path = dump_config(cfg, tmp_path / "out" / "config.yaml", header="resolved")
    assert path.read_text().startswith("# resolved\n")
    again = load_config(path, schema=IntegrationConfig)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert diff_configs(cfg, again) == []


def test_diff_configs_respects_ignored_sections() -> None:
    a = IntegrationConfig()
    b = apply_overrides(a, {"train.epochs": 9, "eval.eval_cells": 100, "model.d_model": 64})
    assert diff_configs(a, b) == ["eval.eval_cells", "model.d_model", "train.epochs"]
    assert diff_configs(a, b, ignore=["eval", "train.epochs"]) == ["model.d_model"]


def test_example_config_loads_and_validates() -> None:
    cfg = load_config(ROOT / "examples" / "integrate.yaml", schema=IntegrationConfig)
    cfg.validate()
    assert cfg.data.batch_key == "batch" and cfg.data.label_key == "cell_type"
    # Every key of the example is a real key with the default value of the schema, apart
    # from the two columns, so the template documents the defaults truthfully.
    defaults = apply_overrides(
        IntegrationConfig(), {"data.batch_key": "batch", "data.label_key": "cell_type"}
    )
    assert diff_configs(cfg, defaults) == []


def test_validate_names_the_fix() -> None:
    with pytest.raises(InputError, match="--batch-key"):
        IntegrationConfig().validate()
    cfg = apply_overrides(IntegrationConfig(), {"data.batch_key": "b"})
    with pytest.raises(InputError, match=r"unknown baseline.*pca,harmony,scvi"):
        apply_overrides(cfg, {"eval.baselines": "pca,umap"}).validate()
    with pytest.raises(InputError, match="valid_fraction"):
        apply_overrides(cfg, {"data.valid_fraction": 1.5}).validate()
    with pytest.raises(InputError, match="both 0"):
        apply_overrides(cfg, {"objective.mse_weight": 0, "objective.gepc_weight": 0}).validate()
