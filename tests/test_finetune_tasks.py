"""``--finetune full | lora | freeze`` through integrate, perturb train and annotate train.

Short real training runs on the shipped data (Kang 1,556 cells subsampled, the Adamson
mini file) from a real scGPT-format model directory: frozen parameters do not move, a LoRA
run is saved merged as a plain scGPT directory whose embeddings equal the unmerged
model's, and bad input (targets that match nothing, an adapter directory) is named.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from celltune.cli.main import main
from celltune.data.io import read_h5ad
from celltune.errors import CheckpointError
from celltune.model import load_model, save_model
from celltune.model.finetune import has_lora
from celltune.tasks.config import load_config
from celltune.tasks.integration import EMBEDDING_KEY, IntegrationConfig, embed, integrate

#: a CI-sized integration run: 300 Kang cells, 100 HVGs, a few optimizer steps
TINY = {
    "data.batch_key": "batch",
    "data.max_cells": 300,
    "data.n_hvg": 100,
    "train.batch_size": 32,
    "train.epochs": 1,
    "train.max_steps_per_epoch": 4,
    "train.lr": 1e-3,
    "train.quiet": True,
    "train.device": "cpu",
    "eval.baselines": [],
}
FROZEN_BY_FREEZE_1 = ("encoder.", "value_encoder.", "transformer_encoder.layers.0.")


@pytest.fixture(scope="module")
def kang(kang_stim_path: Path) -> ad.AnnData:
    return read_h5ad(kang_stim_path)


@pytest.fixture(scope="module")
def pretrained(fixtures_dir: Path) -> Path:
    """scGPT's reference integration model (2 layers, d 32; 121 Kang genes in its vocab)."""
    return fixtures_dir / "fixture_integration"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _assert_frozen(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], moved_prefix: str
) -> None:
    frozen = [k for k in before if k.startswith(FROZEN_BY_FREEZE_1)]
    assert frozen
    changed = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not changed, changed
    trained = [k for k in before if k.startswith(moved_prefix) and k.endswith("weight")]
    assert any(not torch.equal(before[k], after[k]) for k in trained), moved_prefix


# ----------------------------------------------------------------------------- integrate
def test_integrate_freeze_keeps_embeddings_and_first_layer(kang, pretrained, tmp_path) -> None:
    cfg = load_config(
        None,
        {
            **TINY,
            "model.pretrained": str(pretrained),
            "finetune.mode": "freeze",
            "finetune.freeze_layers": 1,
        },
        schema=IntegrationConfig,
    )
    res = integrate(kang, cfg, tmp_path / "run")
    after = _state(load_model(tmp_path / "run" / "model"))
    _assert_frozen(_state(load_model(pretrained)), after, "transformer_encoder.layers.1.")
    saved = load_config(tmp_path / "run" / "config.yaml", schema=IntegrationConfig)
    assert saved.finetune.mode == "freeze" and saved.finetune.freeze_layers == 1
    assert not has_lora(res.model)


def test_integrate_lora_run_resumes_from_its_checkpoint(kang, pretrained, tmp_path) -> None:
    """The checkpoint holds the adapters; --resume rebuilds them (and the pretrained
    sizes) before loading it."""
    over = {**TINY, "model.pretrained": str(pretrained), "finetune.mode": "lora"}
    first = integrate(kang, load_config(None, over, schema=IntegrationConfig), tmp_path / "r")
    over["train.epochs"] = 2
    cfg = load_config(None, over, schema=IntegrationConfig)
    again = integrate(kang, cfg, tmp_path / "r", resume=True)
    assert again.history["epoch"].tolist() == [1, 2]
    assert again.history.loc[0, "val/mse"] == first.history.loc[0, "val/mse"]
    assert has_lora(again.model) and not has_lora(load_model(tmp_path / "r" / "model"))


@pytest.mark.e2e
def test_integrate_lora_cli_saves_plain_scgpt_dir_with_same_embeddings(
    kang_stim_path, pretrained, tmp_path
) -> None:
    out = tmp_path / "lora"
    flags = [
        "integrate", str(kang_stim_path), "--batch-key", "batch", "--out", str(out),
        "--pretrained", str(pretrained), "--finetune", "lora", "--lora-rank", "4",
        "--lora-alpha", "8", "--lora-targets", "in_proj,linear1", "--epochs", "1",
        "--batch-size", "32", "--n-hvg", "100", "--baselines", "none", "--device", "cpu",
        "--quiet", "--set", "data.max_cells=300", "--set", "train.max_steps_per_epoch=4",
        "--set", "train.lr=1e-3",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main(flags)
    assert done.value.code == 0
    mdir = out / "model"
    sd = torch.load(mdir / "best_model.pt", weights_only=True)
    assert not any("lora" in k or "base_layer" in k for k in sd)
    assert "transformer_encoder.layers.0.self_attn.in_proj_weight" in sd
    merged = load_model(mdir)  # celltune's loader: a plain scGPT directory
    assert not has_lora(merged) and not merged.load_report.missing
    assert not merged.load_report.unexpected
    base = _state(load_model(pretrained))
    # the adapted layers moved (the delta is merged in), the others did not
    w = "transformer_encoder.layers.0."
    assert not torch.equal(sd[w + "self_attn.in_proj_weight"], base[w + "self_attn.in_proj_weight"])
    assert torch.equal(sd[w + "linear2.weight"], base[w + "linear2.weight"])
    assert torch.equal(sd["encoder.embedding.weight"], base["encoder.embedding.weight"])
    # integrated.h5ad was embedded by the unmerged (adapter) model; the merged one agrees
    adata = ad.read_h5ad(out / "integrated.h5ad")
    # every input gene: embed keeps the run's HVGs (celltune_task.json), not every gene of
    # the pretrained vocabulary that the file holds
    task = json.loads((mdir / "celltune_task.json").read_text())
    assert task["genes"] == list(adata.var_names[adata.var["celltune_hvg"].to_numpy()])
    assert adata.n_vars > len(task["genes"])
    again = embed(adata, mdir, batch_key="batch", batch_size=50, quiet=True)
    assert again.uns["celltune"]["embed"]["n_genes_matched"] == len(task["genes"])
    np.testing.assert_allclose(again.obsm[EMBEDDING_KEY], adata.obsm[EMBEDDING_KEY], atol=1e-4)
    cfg = load_config(out / "config.yaml", schema=IntegrationConfig)
    assert cfg.finetune.lora_targets == ["in_proj", "linear1"] and cfg.finetune.lora_rank == 4


def test_lora_targets_matching_nothing_name_the_layers(
    kang_stim_path, pretrained, tmp_path, capsys
):
    flags = [
        "integrate", str(kang_stim_path), "--batch-key", "batch", "--out", str(tmp_path / "r"),
        "--pretrained", str(pretrained), "--finetune", "lora", "--lora-targets", "Wqkv,q_proj",
        "--epochs", "1", "--n-hvg", "100", "--baselines", "none", "--quiet",
        "--set", "data.max_cells=300",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as err:
        main(flags)
    assert err.value.code == 2
    text = " ".join(capsys.readouterr().err.split())
    assert "Wqkv,q_proj match no linear layer" in text
    assert "in_proj, linear1, linear2, out_proj" in text


def _adapter_dir(root: Path) -> Path:
    """What peft's save_pretrained writes for a LoRA adapter (config + low-rank weights)."""
    from safetensors.torch import save_file

    root.mkdir()
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file(
        {"transformer_encoder.layers.0.self_attn.in_proj.lora_A.weight": torch.zeros(8, 32)},
        str(root / "adapter_model.safetensors"),
    )
    return root


def test_adapter_directory_as_pretrained_is_named(kang, tmp_path, pretrained) -> None:
    adapter = _adapter_dir(tmp_path / "adapter")
    cfg = load_config(None, {**TINY, "model.pretrained": str(adapter)}, schema=IntegrationConfig)
    with pytest.raises(CheckpointError, match="LoRA adapter directory"):
        integrate(kang, cfg)
    # an adapter directory with the model's args/vocab copied in is still no model
    for name in ("args.json", "vocab.json"):
        (adapter / name).write_bytes((pretrained / name).read_bytes())
    with pytest.raises(CheckpointError, match="LoRA adapter directory"):
        load_model(adapter)
    # un-merged adapter weights saved as a model's best_model.pt
    model = load_model(pretrained)
    from celltune.model.finetune import FinetuneSpec, apply_finetune

    apply_finetune(model, FinetuneSpec(mode="lora"))
    bad = tmp_path / "unmerged"
    bad.mkdir()
    for name in ("args.json", "vocab.json"):
        (bad / name).write_bytes((pretrained / name).read_bytes())
    torch.save(model.state_dict(), bad / "best_model.pt")
    with pytest.raises(CheckpointError, match="un-merged LoRA adapter weights"):
        load_model(bad)


# ----------------------------------------------------------------------------- perturb
@pytest.fixture(scope="module")
def adamson_prepared(adamson_mini_path: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The prepared Adamson mini file and a scGPT-format model over its genes (random
    weights, 2 layers) standing in for a pretrained model."""
    from celltune.data.gears import prepare_perturbation_data, write_prepared
    from celltune.data.vocab import GeneVocab
    from celltune.model.config import ModelConfig
    from celltune.model.model import CellTransformer

    root = tmp_path_factory.mktemp("adamson_ft")
    prepared = prepare_perturbation_data(
        ad.read_h5ad(adamson_mini_path), data_is_raw=False, split="simulation", seed=1
    )
    write_prepared(prepared, root / "data.h5ad")
    vocab = GeneVocab.from_genes(prepared.var["gene_name"].astype(str).tolist())
    torch.manual_seed(0)
    mc = ModelConfig(
        ntoken=len(vocab), pad_id=vocab.pad_id, d_model=32, nhead=2, d_hid=32, nlayers=2
    )
    save_model(CellTransformer(mc, vocab=vocab), root / "pre")
    return root / "data.h5ad", root / "pre"


@pytest.mark.e2e
def test_perturb_train_freeze_and_lora(adamson_prepared, tmp_path) -> None:
    data, pre = adamson_prepared
    common = [
        "perturb", "train", str(data), "--pretrained", str(pre), "--epochs", "1",
        "--batch-size", "32", "--device", "cpu", "--quiet",
        "--set", "data.n_eval_ctrl=40", "--set", "data.control_pool=60",
        "--set", "train.max_steps_per_epoch=4", "--set", "train.lr=1e-3",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main([*common, "--out", str(tmp_path / "freeze"), "--finetune", "freeze",
              "--freeze-layers", "1"])  # fmt: skip
    assert done.value.code == 0
    before = _state(load_model(pre))
    after = _state(load_model(tmp_path / "freeze" / "model"))
    _assert_frozen(before, after, "transformer_encoder.layers.1.")
    run = json.loads((tmp_path / "freeze" / "run.json").read_text())
    assert run["finetune"]["mode"] == "freeze"

    with pytest.raises(SystemExit) as done:
        main([*common, "--out", str(tmp_path / "lora"), "--set", "finetune.mode=lora"])
    assert done.value.code == 0
    merged = load_model(tmp_path / "lora" / "model")
    assert not has_lora(merged) and not merged.load_report.missing
    lora = _state(merged)
    # embeddings frozen under LoRA; attention weights moved by the merged adapters
    assert torch.equal(lora["encoder.embedding.weight"], before["encoder.embedding.weight"])
    key = "transformer_encoder.layers.1.self_attn.in_proj_weight"
    assert not torch.equal(lora[key], before[key])
    from celltune.tasks.perturbation import predict_perturbations

    pred = predict_perturbations(tmp_path / "lora", ["HSPA5"], n_ctrl=10)
    assert np.isfinite(pred.mean.to_numpy()).all()


# ----------------------------------------------------------------------------- annotate
def _inputs(pretrained: Path) -> dict[str, torch.Tensor]:
    with np.load(pretrained / "golden" / "inputs.npz") as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def _cls(model: torch.nn.Module, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(
            inp["gene_ids"], inp["values"], padding_mask=inp["src_key_padding_mask"], CLS=True
        )
    return out["cls_output"]


@pytest.mark.e2e
def test_annotate_train_lora_and_freeze(kang, pretrained, tmp_path) -> None:
    from typer.testing import CliRunner

    from celltune.cli.main import app
    from celltune.tasks.annotation import train_annotation

    ref = kang[kang.obs["batch"] == "ctrl"].copy()
    tiny = {
        "label_key": "cell_type",
        "pretrained": str(pretrained),
        "max_seq_len": 64,
        "train": {"epochs": 1, "lr": 1e-3, "max_steps_per_epoch": 4, "quiet": True},
    }
    res = train_annotation(
        ref, {**tiny, "finetune": {"mode": "lora", "lora_rank": 4}}, tmp_path / "l"
    )
    assert has_lora(res.model)
    merged = load_model(res.model_dir)
    assert not has_lora(merged) and not merged.load_report.missing
    inp = _inputs(pretrained)
    torch.testing.assert_close(_cls(merged, inp), _cls(res.model, inp), atol=1e-4, rtol=1e-4)

    ref.write_h5ad(tmp_path / "ref.h5ad")
    out = tmp_path / "f"
    got = CliRunner().invoke(
        app,
        ["annotate", "train", str(tmp_path / "ref.h5ad"), "--label-key", "cell_type",
         "--out", str(out), "--pretrained", str(pretrained), "--finetune", "freeze",
         "--freeze-layers", "1", "--epochs", "1", "--lr", "1e-3", "--max-seq-len", "64",
         "--max-steps-per-epoch", "4", "--device", "cpu", "--quiet",
         "--set", "finetune.lora_rank=2"],
    )  # fmt: skip
    assert got.exit_code == 0, got.output
    _assert_frozen(_state(load_model(pretrained)), _state(load_model(out / "model")),
                   "transformer_encoder.layers.1.")  # fmt: skip
    saved = (out / "config.yaml").read_text()
    assert "mode: freeze" in saved and "freeze_layers: 1" in saved and "lora_rank: 2" in saved
