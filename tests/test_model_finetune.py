"""Fine-tuning modes (full / lora / freeze) on the scGPT reference fixture model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from celltune.errors import CheckpointError, InputError
from celltune.model import load_model, save_model
from celltune.model.finetune import FinetuneSpec, apply_finetune, has_lora, merge_lora

KW = dict(CLS=False, CCE=False, MVC=True, ECS=False, do_sample=False)


@pytest.fixture(scope="module")
def integ_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "fixture_integration"


@pytest.fixture(scope="module")
def inputs(integ_dir: Path) -> dict[str, torch.Tensor]:
    with np.load(integ_dir / "golden" / "inputs.npz") as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def _forward(model: torch.nn.Module, inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return model(
        inp["gene_ids"],
        inp["values"],
        src_key_padding_mask=inp["src_key_padding_mask"],
        batch_labels=inp["batch_labels"],
        **KW,
    )


def _train_steps(model: torch.nn.Module, inp: dict[str, torch.Tensor], steps: int = 3) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    target = inp["values"].clone()
    for _ in range(steps):
        out = _forward(model, inp)
        loss = ((out["mlm_output"] - target) ** 2).mean() + out["mvc_output"].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_freeze_keeps_embeddings_and_first_layers_unchanged(integ_dir: Path, inputs) -> None:
    model = load_model(integ_dir)
    apply_finetune(model, FinetuneSpec(mode="freeze", freeze_layers=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model, inputs)
    after = model.state_dict()
    frozen = [
        k
        for k in before
        if k.startswith(("encoder.", "value_encoder.", "transformer_encoder.layers.0."))
    ]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    moved = [k for k in before if k.startswith("transformer_encoder.layers.1.") and "weight" in k]
    assert any(not torch.equal(before[k], after[k]) for k in moved)


def test_lora_trains_adapters_only_and_merge_matches_unmerged(integ_dir: Path, inputs) -> None:
    model = load_model(integ_dir)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    apply_finetune(model, FinetuneSpec(mode="lora", lora_rank=4, lora_alpha=8))
    _train_steps(model, inputs)
    trunk = [k for k in plain if k.startswith("transformer_encoder.")]
    for name, param in model.named_parameters():
        if "base_layer" in name:  # the frozen weights under the adapters
            saved = name.replace(".in_proj.base_layer.", ".in_proj_").replace("base_layer.", "")
            assert saved in trunk and torch.equal(param.detach(), plain[saved])
    with torch.no_grad():
        unmerged = _forward(model, inputs)["mlm_output"]
    merge_lora(model)
    assert not has_lora(model)
    assert list(model.state_dict()) == list(plain)
    with torch.no_grad():
        merged = _forward(model, inputs)["mlm_output"]
    assert not torch.allclose(merged, _forward(load_model(integ_dir), inputs)["mlm_output"])
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


def test_saved_lora_run_is_a_plain_scgpt_directory(integ_dir: Path, inputs, tmp_path: Path) -> None:
    model = load_model(integ_dir)
    apply_finetune(model, FinetuneSpec(mode="lora", lora_rank=2))
    _train_steps(model, inputs, steps=2)
    with torch.no_grad():
        expected = _forward(model, inputs)["mlm_output"]
    save_model(model, tmp_path / "run")
    assert has_lora(model)  # saving merges a copy, the training model keeps its adapters
    sd = torch.load(tmp_path / "run" / "best_model.pt", weights_only=True)
    assert not any("lora" in k or "base_layer" in k for k in sd)
    assert "transformer_encoder.layers.0.self_attn.in_proj_weight" in sd
    reloaded = load_model(tmp_path / "run")
    with torch.no_grad():
        got = _forward(reloaded, inputs)["mlm_output"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_works_with_lora(integ_dir: Path, inputs) -> None:
    model = load_model(integ_dir, grad_checkpoint=True)
    apply_finetune(model, FinetuneSpec(mode="lora"))
    model.train()
    out = _forward(model, inputs)
    out["mlm_output"].pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_lora_targets_that_match_nothing_name_the_layers(integ_dir: Path) -> None:
    model = load_model(integ_dir)
    with pytest.raises(InputError, match=r"match no linear layer.*in_proj"):
        apply_finetune(model, FinetuneSpec(mode="lora", lora_targets=("Wqkv", "q_proj")))


def test_bad_mode_and_freeze_depth_are_input_errors(integ_dir: Path) -> None:
    model = load_model(integ_dir)
    with pytest.raises(InputError, match="full"):
        apply_finetune(model, FinetuneSpec(mode="adapters"))
    n = model.config.nlayers
    with pytest.raises(InputError, match=f"has {n} transformer layers"):
        apply_finetune(model, FinetuneSpec(mode="freeze", freeze_layers=n + 1))


def test_adapter_directory_where_a_model_is_expected(tmp_path: Path) -> None:
    adapter = tmp_path / "lora_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="LoRA adapter directory"):
        load_model(adapter)
