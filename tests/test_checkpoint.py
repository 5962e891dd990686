"""Model directories: save/load round trip, scGPT namings, partial loads, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from celltune.errors import CheckpointError
from celltune.model import (
    CellTransformer,
    ModelConfig,
    load_model,
    load_weights,
    read_state_dict,
    save_model,
)


def _copy_fixture(fixtures_dir: Path, name: str, dst: Path) -> Path:
    shutil.copytree(fixtures_dir / name, dst, ignore=shutil.ignore_patterns("golden"))
    for p in dst.iterdir():
        p.chmod(0o644)
    dst.chmod(0o755)
    return dst


def _inputs(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    with np.load(fixtures_dir / "fixture_integration" / "golden" / "inputs_mixed.npz") as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def _outputs(model: CellTransformer, inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(
            inp["gene_ids"],
            inp["values"],
            padding_mask=inp["src_key_padding_mask"],
            batch_labels=inp["batch_labels"],
            MVC=True,
            CLS=True,
        )


def test_save_load_round_trip(fixtures_dir: Path, tmp_path: Path) -> None:
    model = load_model(fixtures_dir / "fixture_integration", dsbn_mode="first", attn_dropout=0.1)
    inp = _inputs(fixtures_dir)
    ref = _outputs(model, inp)
    out_dir = save_model(model, tmp_path / "saved")
    assert {p.name for p in out_dir.iterdir()} == {
        "args.json",
        "vocab.json",
        "best_model.pt",
        "model.safetensors",
        "manifest.json",
    }
    args = json.loads((out_dir / "args.json").read_text())
    for key in (
        "embsize",
        "nheads",
        "d_hid",
        "nlayers",
        "n_layers_cls",
        "pad_value",
        "input_emb_style",
        "cell_emb_style",
        "explicit_zero_prob",
        "dsbn_mode",
        "attn_dropout",
        "domain_spec_batchnorm",
        "num_batch_labels",
    ):
        assert key in args, key
    vocab = json.loads((out_dir / "vocab.json").read_text())
    assert vocab == json.loads((fixtures_dir / "fixture_integration" / "vocab.json").read_text())
    # scGPT format: a plain state_dict with scGPT's names, loadable with weights_only
    sd = torch.load(out_dir / "best_model.pt", weights_only=True)
    assert list(sd) == list(model.state_dict())
    back = load_model(out_dir)
    assert back.config == model.config
    for k, v in _outputs(back, inp).items():
        torch.testing.assert_close(v, ref[k])
    # safetensors alone is enough
    (out_dir / "best_model.pt").unlink()
    for k, v in _outputs(load_model(out_dir), inp).items():
        torch.testing.assert_close(v, ref[k])
    assert not list(out_dir.glob(".*tmp"))


@pytest.mark.parametrize("naming", ["Wqkv", "_impl.Wqkv", "module."])
def test_flash_attention_and_ddp_names_load(
    fixtures_dir: Path, tmp_path: Path, naming: str
) -> None:
    d = _copy_fixture(fixtures_dir, "fixture_integration", tmp_path / "m")
    sd = torch.load(d / "best_model.pt", weights_only=True)
    renamed = {}
    for k, v in sd.items():
        if naming == "module.":
            k = "module." + k
        else:
            k = k.replace("self_attn.in_proj_", f"self_attn.{naming}.")
            if naming.startswith("_impl"):
                k = k.replace("self_attn.out_proj", "self_attn._impl.out_proj")
        renamed[k] = v
    assert any(naming in k for k in renamed)
    torch.save(renamed, d / "best_model.pt")
    model = load_model(d)
    assert len(model.load_report.loaded) == len(sd) and not model.load_report.missing
    torch.testing.assert_close(
        model.state_dict()["transformer_encoder.layers.1.self_attn.in_proj_weight"],
        sd["transformer_encoder.layers.1.self_attn.in_proj_weight"],
    )


def test_prefix_filtering_loads_only_the_trunk(fixtures_dir: Path) -> None:
    """Perturbation fine-tuning from an integration model: encoder + transformer only."""
    sd = read_state_dict(fixtures_dir / "fixture_integration" / "best_model.pt")
    gen = CellTransformer(
        ModelConfig(
            ntoken=203,
            d_model=32,
            nhead=4,
            d_hid=64,
            nlayers=2,
            pad_id=200,
            generator=True,
            decoder="affine",
            do_mvc=False,
            explicit_zero_prob=False,
            pad_value=0,
        )
    )
    before = gen.state_dict()["decoder.coeff_decoder.fc.0.weight"].clone()
    prefixes = ["encoder", "value_encoder", "transformer_encoder"]
    report = load_weights(gen, sd, prefixes=prefixes)
    assert report.loaded and all(k.startswith(tuple(prefixes)) for k in report.loaded)
    assert len(report.loaded) == 3 + 6 + 2 * 12
    assert "pert_encoder.weight" in report.missing
    torch.testing.assert_close(gen.state_dict()["decoder.coeff_decoder.fc.0.weight"], before)
    torch.testing.assert_close(
        gen.state_dict()["encoder.embedding.weight"], sd["encoder.embedding.weight"]
    )


def test_shape_mismatch_is_skipped_and_reported(fixtures_dir: Path) -> None:
    sd = read_state_dict(fixtures_dir / "fixture_integration" / "best_model.pt")
    model = CellTransformer(
        ModelConfig(
            ntoken=203,
            d_model=32,
            nhead=4,
            d_hid=64,
            nlayers=2,
            pad_id=200,
            n_cls=7,
            do_dab=True,
            num_batch_labels=3,
            use_batch_labels=True,
        )
    )
    report = load_weights(model, sd)
    skipped = {k: (a, b) for k, a, b in report.skipped_shape}
    assert skipped["cls_decoder.out_layer.weight"] == ((1, 32), (7, 32))
    assert skipped["batch_encoder.embedding.weight"] == ((2, 32), (3, 32))
    assert "cls_decoder.out_layer.weight" in report.missing
    assert "transformer_encoder.layers.0.linear1.weight" in report.loaded
    assert "skipped 4" in report.summary() or "skipped" in report.summary()


class Evil:  # a pickled object that would need code to rebuild
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    d = _copy_fixture(fixtures_dir, "fixture_generator", tmp_path / "m")
    torch.save({"encoder.embedding.weight": torch.zeros(203, 32), "x": Evil()}, d / "best_model.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(d)


def test_missing_args_key_vocab_mismatch_and_missing_files(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    d = _copy_fixture(fixtures_dir, "fixture_generator", tmp_path / "m")
    args = json.loads((d / "args.json").read_text())
    del args["nheads"]
    (d / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match="'nheads'"):
        load_model(d)
    args["nheads"] = 4
    args["nlayers"] = 3
    (d / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match="nlayers=3"):
        load_model(d)
    args["nlayers"] = 2
    (d / "args.json").write_text(json.dumps(args))
    vocab = json.loads((d / "vocab.json").read_text())
    small = {k: v for k, v in vocab.items() if v < 150 or k.startswith("<")}
    small = {k: i for i, k in enumerate(small)}
    (d / "vocab.json").write_text(json.dumps(small))
    with pytest.raises(CheckpointError, match="does not belong"):
        load_model(d)
    (d / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"vocab\.json"):
        load_model(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_state_dict_wrappers_and_non_state_dicts(tmp_path: Path) -> None:
    t = {"encoder.embedding.weight": torch.ones(2, 2)}
    torch.save({"model_state_dict": t, "epoch": 3}, tmp_path / "a.pt")
    assert set(read_state_dict(tmp_path / "a.pt")) == set(t)
    torch.save([torch.ones(1)], tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="state_dict"):
        read_state_dict(tmp_path / "b.pt")
    (tmp_path / "c.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(tmp_path / "c.safetensors")
