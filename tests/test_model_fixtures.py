"""Compatibility with the scGPT reference: load its model directories, reproduce its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from celltune.losses import IntegrationObjective, PerturbationObjective, masked_relative_error
from celltune.model import load_model

ATOL, RTOL = 1e-5, 1e-4
KW = dict(CLS=True, CCE=True, MVC=True, ECS=True, do_sample=False)


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _run_integration(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(
            torch.from_numpy(inputs["gene_ids"]),
            torch.from_numpy(inputs["values"]),
            src_key_padding_mask=torch.from_numpy(inputs["src_key_padding_mask"]),
            batch_labels=torch.from_numpy(inputs["batch_labels"]),
            **KW,
        )
    return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def integ_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "fixture_integration"


@pytest.fixture(scope="module")
def gen_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "fixture_generator"


@pytest.mark.parametrize("name", ["fixture_integration", "fixture_generator"])
def test_state_dict_keys_shapes_and_order_are_scgpts(fixtures_dir: Path, name: str) -> None:
    meta = json.loads((fixtures_dir / name / "golden" / "meta.json").read_text())
    model = load_model(fixtures_dir / name)
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(k, list(shape)) for k, shape, _ in meta["state_dict"]]
    assert ours == theirs
    assert model.num_parameters() == meta["n_parameters"]
    report = model.load_report
    assert not report.missing and not report.unexpected and not report.skipped_shape


def test_integration_config_is_inferred_from_weights(integ_dir: Path) -> None:
    meta = json.loads((integ_dir / "golden" / "meta.json").read_text())["constructor_kwargs"]
    c = load_model(integ_dir).config
    for key in (
        "ntoken",
        "d_model",
        "nhead",
        "d_hid",
        "nlayers",
        "nlayers_cls",
        "n_cls",
        "dropout",
        "pad_value",
        "do_mvc",
        "do_dab",
        "use_batch_labels",
        "num_batch_labels",
        "domain_spec_batchnorm",
        "input_emb_style",
        "cell_emb_style",
        "mvc_decoder_style",
        "explicit_zero_prob",
    ):
        assert getattr(c, key) == meta[key], key
    assert c.pad_id == 200 and not c.generator


@pytest.mark.parametrize(
    ("inputs", "outputs", "dsbn_mode"),
    [
        ("inputs", "outputs", "per_cell"),
        ("inputs", "outputs", "first"),
        ("inputs_mixed", "outputs_mixed", "first"),
    ],
)
def test_integration_outputs_reproduced(
    integ_dir: Path, inputs: str, outputs: str, dsbn_mode: str
) -> None:
    model = load_model(integ_dir, dsbn_mode=dsbn_mode)
    inp = _npz(integ_dir / "golden" / f"{inputs}.npz")
    out = _run_integration(model, inp)
    pad = inp["src_key_padding_mask"]
    nofast = _npz(integ_dir / "golden" / f"{outputs}_nofastpath.npz")
    fast = _npz(integ_dir / "golden" / f"{outputs}.npz")
    expected_keys = {
        "mlm_output",
        "mlm_zero_probs",
        "cell_emb",
        "mvc_output",
        "mvc_zero_probs",
        "dab_output",
        "cls_output",
        "loss_ecs",
        "loss_cce",
    }
    assert set(out) == expected_keys
    for key in expected_keys:
        np.testing.assert_allclose(out[key], nofast[key], atol=ATOL, rtol=RTOL, err_msg=key)
        if key.startswith("mlm"):  # fast path: zeros in at padded positions
            np.testing.assert_allclose(out[key][~pad], fast[key][~pad], atol=ATOL, rtol=RTOL)
        else:
            np.testing.assert_allclose(out[key], fast[key], atol=ATOL, rtol=RTOL, err_msg=key)
    assert pad.any() and not np.allclose(out["mlm_output"][pad], fast["mlm_output"][pad])


def test_per_cell_dsbn_differs_from_first_cell_on_mixed_batches(integ_dir: Path) -> None:
    """Per-cell DSBN = feeding each batch's cells alone; scGPT's first-cell DSBN is not."""
    inp = _npz(integ_dir / "golden" / "inputs_mixed.npz")
    ref = _npz(integ_dir / "golden" / "outputs_mixed_nofastpath.npz")["cell_emb"]
    out = _run_integration(load_model(integ_dir), inp)["cell_emb"]
    first = inp["batch_labels"] == inp["batch_labels"][0]
    np.testing.assert_allclose(out[first], ref[first], atol=ATOL, rtol=RTOL)
    assert np.abs(out[~first] - ref[~first]).max() > 0.01
    # each label-1 cell equals what scGPT itself gives when the cell is fed alone
    model_first = load_model(integ_dir, dsbn_mode="first")
    for i in np.flatnonzero(~first):
        alone = {k: v[i : i + 1] for k, v in inp.items()}
        single = _run_integration(model_first, alone)["cell_emb"][0]
        np.testing.assert_allclose(out[i], single, atol=ATOL, rtol=RTOL)


def test_generator_outputs_reproduced(gen_dir: Path) -> None:
    model = load_model(gen_dir)
    c = model.config
    assert c.generator and c.decoder == "affine" and c.pert_pad_id == 0 and c.pad_value == 0
    inp = _npz(gen_dir / "golden" / "inputs.npz")
    with torch.no_grad():
        out = model(
            torch.from_numpy(inp["gene_ids"]),
            torch.from_numpy(inp["values"]),
            torch.from_numpy(inp["pert_flags"]),
            src_key_padding_mask=torch.from_numpy(inp["src_key_padding_mask"]),
            CLS=False,
            CCE=False,
            MVC=False,
            ECS=False,
        )
    for name in ("outputs", "outputs_nofastpath"):
        ref = _npz(gen_dir / "golden" / f"{name}.npz")
        np.testing.assert_allclose(
            out["mlm_output"].numpy(), ref["mlm_output"], atol=ATOL, rtol=RTOL
        )
    loss, terms = PerturbationObjective()(
        out, {"target_values": torch.from_numpy(inp["target_values"])}
    )
    assert loss.item() == pytest.approx(float(ref["loss_mse"]), rel=1e-5)
    assert set(terms) == {"loss_mse"}


@pytest.mark.parametrize("stem", ["outputs", "outputs_mixed"])
def test_fixture_losses_reproduced_from_its_outputs(integ_dir: Path, stem: str) -> None:
    inputs = "inputs_mixed" if stem.endswith("mixed") else "inputs"
    inp = _npz(integ_dir / "golden" / f"{inputs}.npz")
    ref = {k: torch.from_numpy(v) for k, v in _npz(integ_dir / "golden" / f"{stem}.npz").items()}
    mask = torch.from_numpy(inp["values"] == -1)
    batch = {
        "target_values": torch.from_numpy(inp["target_values"]),
        "batch_labels": torch.from_numpy(inp["batch_labels"]),
    }
    total, terms = IntegrationObjective()(ref, batch, mask)
    for key in (
        "loss_mse",
        "loss_zero_log_prob",
        "loss_gepc",
        "loss_gepc_zero_log_prob",
        "loss_ecs",
        "loss_dab",
    ):
        assert terms[key].item() == pytest.approx(ref[key].item(), rel=1e-5), key
    assert total.item() == pytest.approx(ref["loss_total"].item(), rel=1e-5)
    mre = masked_relative_error(ref["mlm_output"], batch["target_values"], mask)
    assert mre.item() == pytest.approx(ref["mre"].item(), rel=1e-5)


def test_fixture_losses_from_our_own_forward(integ_dir: Path) -> None:
    """End to end: our outputs → our objective gives scGPT's loss_total."""
    inp = _npz(integ_dir / "golden" / "inputs.npz")
    ref = _npz(integ_dir / "golden" / "outputs_nofastpath.npz")
    out = {k: torch.from_numpy(v) for k, v in _run_integration(load_model(integ_dir), inp).items()}
    batch = {
        "target_values": torch.from_numpy(inp["target_values"]),
        "batch_labels": torch.from_numpy(inp["batch_labels"]),
    }
    total, _ = IntegrationObjective()(out, batch, torch.from_numpy(inp["values"] == -1))
    assert total.item() == pytest.approx(float(ref["loss_total"]), rel=1e-5)


def test_scgpt_embed_data_style_partial_load(integ_dir: Path) -> None:
    """scGPT's generic reader builds a model without batch heads and loads what matches."""
    from celltune.model import CellTransformer, ModelConfig, load_weights, read_state_dict

    sd = read_state_dict(integ_dir / "best_model.pt")
    conf = ModelConfig(
        ntoken=203,
        d_model=32,
        nhead=4,
        d_hid=64,
        nlayers=2,
        pad_id=200,
        do_mvc=False,
        explicit_zero_prob=False,
    )
    model = CellTransformer(conf)
    report = load_weights(model, sd)
    assert "transformer_encoder.layers.1.norm2.bias" in report.loaded
    assert any(k.startswith("dsbn.") for k in report.unexpected)
    assert "decoder.fc.0.weight" in [k for k, _, _ in report.skipped_shape]  # 64 vs 32 inputs
    assert "decoder.fc.0.weight" in report.missing
