"""Perturbation response prediction (issue 5): pairing, flags, gene sampling, clipping,
bad input, and prepare → train → predict → evaluate end to end on the real files."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from celltune.data.gears import prepare_perturbation_data, write_prepared
from celltune.errors import InputError
from celltune.tasks.perturbation import (
    PerturbConfig,
    check_prepared,
    load_run,
    predict_cells,
    predict_perturbations,
    train_perturbation_model,
)
from celltune.tasks.perturbation.pairing import (
    PairedItem,
    PerturbationCollator,
    PerturbationPairs,
    cell_rng,
    inference_chunks,
    select_gene_positions,
    stable_cell_keys,
)

# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def adamson(adamson_mini_path: Path) -> ad.AnnData:
    return ad.read_h5ad(adamson_mini_path)


@pytest.fixture(scope="module")
def adamson_dense(adamson: ad.AnnData) -> np.ndarray:
    return np.asarray(adamson.X.toarray(), dtype=np.float32)


def _col(adata: ad.AnnData, gene: str) -> int:
    return int(np.flatnonzero(adata.var["gene_name"].astype(str).to_numpy() == gene)[0])


def _tiny_config(**train: object) -> PerturbConfig:
    cfg = PerturbConfig()
    cfg.model.d_model = cfg.model.d_hid = 32
    cfg.model.nhead = 2
    cfg.model.nlayers = 1
    cfg.data.n_eval_ctrl = 40
    cfg.data.control_pool = 60
    cfg.train = cfg.train.replace(
        **{"epochs": 2, "batch_size": 32, "quiet": True, "device": "cpu", **train}
    )
    return cfg


# ------------------------------------------------------------------ gene sampling / flags


def test_perturbed_gene_always_kept_when_cut(adamson: ad.AnnData, adamson_dense: np.ndarray):
    """scGPT issue #298: cutting 160 genes to 16 must never drop the perturbed gene(s)."""
    pert = np.array([_col(adamson, "HSPA5"), _col(adamson, "SEC61A1")])
    cands = np.arange(adamson.n_vars)
    chosen_sets = set()
    for seed in range(200):
        row = adamson_dense[seed % adamson.n_obs]
        cols = select_gene_positions(
            row,
            pert,
            candidate_cols=cands,
            include_zero_gene="all",
            max_seq_len=16,
            rng=np.random.default_rng(seed),
        )
        assert len(cols) == 16
        assert set(pert) <= set(cols.tolist())
        assert len(np.unique(cols)) == 16
        chosen_sets.add(tuple(cols))
    assert len(chosen_sets) > 100  # the rest really is sampled


def test_nonzero_mode_keeps_zero_perturbed_gene(adamson: ad.AnnData, adamson_dense: np.ndarray):
    """With include_zero_gene='nonzero' a perturbed gene that is 0 in the control input
    still gets its flag position; all other positions are expressed genes."""
    ctrl_rows = np.flatnonzero(adamson.obs["condition"].astype(str).to_numpy() == "ctrl")
    # find a real control cell and a gene that is zero in it
    row = next(adamson_dense[r] for r in ctrl_rows if (adamson_dense[r] == 0).any())
    zero_gene = int(np.flatnonzero(row == 0)[0])
    cols = select_gene_positions(
        row,
        np.array([zero_gene]),
        candidate_cols=np.arange(adamson.n_vars),
        include_zero_gene="nonzero",
        max_seq_len=10_000,
        rng=np.random.default_rng(0),
    )
    assert zero_gene in cols
    others = cols[cols != zero_gene]
    assert (row[others] != 0).all()
    assert len(others) == int((row != 0).sum())


def test_bad_include_zero_gene_is_input_error(adamson_dense: np.ndarray):
    with pytest.raises(InputError, match="include_zero_gene"):
        select_gene_positions(
            adamson_dense[0],
            np.array([0]),
            candidate_cols=np.arange(10),
            include_zero_gene="batch-wise",  # type: ignore[arg-type]
            max_seq_len=5,
            rng=np.random.default_rng(0),
        )


def test_collator_flags_padding_and_values(adamson: ad.AnnData, adamson_dense: np.ndarray):
    """Flags are 1 exactly at the perturbed genes, pert_pad_id on padding, values/targets
    are the control/perturbed cells' values at the sequence's genes."""
    gene_ids = np.arange(adamson.n_vars) + 3  # any vocabulary ids
    col = _col(adamson, "HSPA9")
    items = [
        PairedItem(0, 11, adamson_dense[0], adamson_dense[100], np.array([col])),
        PairedItem(1, 12, adamson_dense[1], adamson_dense[1], np.array([], dtype=np.int64)),
    ]
    coll = PerturbationCollator(
        gene_ids=gene_ids,
        pad_id=0,
        pad_value=-2.0,
        pert_pad_id=2,
        include_zero_gene="nonzero",
        max_seq_len=40,
        seed=3,
    )
    batch = coll(items)
    flags, pad = batch["pert_flags"].numpy(), batch["padding_mask"].numpy()
    cols = batch["col_index"].numpy()
    # item 0: one flag, at HSPA9
    assert (flags[0][~pad[0]] == 1).sum() == 1
    assert cols[0][flags[0] == 1].tolist() == [col]
    # item 1 (control): no flag at all
    assert (flags[1][~pad[1]] == 1).sum() == 0
    # padding positions carry the pad ids / values
    for b in range(2):
        assert (flags[b][pad[b]] == 2).all()
        assert (batch["gene_ids"].numpy()[b][pad[b]] == 0).all()
        real = cols[b][~pad[b]]
        np.testing.assert_array_equal(batch["gene_ids"].numpy()[b][~pad[b]], gene_ids[real])
        np.testing.assert_allclose(batch["values"].numpy()[b][~pad[b]], items[b].control[real])
        np.testing.assert_allclose(
            batch["target_values"].numpy()[b][~pad[b]], items[b].target[real]
        )


def test_pairing_is_seeded_per_epoch_and_controls_pair_with_themselves(adamson: ad.AnnData):
    cond = adamson.obs["condition"].astype(str).to_numpy()
    ctrl = np.flatnonzero(cond == "ctrl")
    pert = np.flatnonzero(cond == "HSPA5+ctrl")
    targets = np.concatenate([pert, ctrl[:5]])
    cols = [np.array([_col(adamson, "HSPA5")])] * len(pert) + [np.array([], dtype=np.int64)] * 5
    keys = stable_cell_keys(adamson.obs_names)
    ds = PerturbationPairs(
        adamson.X, target_idx=targets, pert_cols=cols, control_idx=ctrl, keys=keys, seed=4
    )
    ds.set_epoch(0)
    e0 = [ds.partner(i) for i in range(len(ds))]
    again = [ds.partner(i) for i in reversed(range(len(ds)))][::-1]
    assert e0 == again  # independent of the order the cells are visited in
    assert all(p in set(ctrl.tolist()) for p in e0[: len(pert)])
    assert e0[len(pert) :] == ctrl[:5].tolist()  # control: input = target (GEARS)
    ds.set_epoch(1)
    e1 = [ds.partner(i) for i in range(len(pert))]
    assert e1 != e0[: len(pert)]  # re-drawn every epoch
    ds2 = PerturbationPairs(
        adamson.X, target_idx=targets, pert_cols=cols, control_idx=ctrl, keys=keys, seed=4
    )
    ds2.set_epoch(1)
    assert [ds2.partner(i) for i in range(len(pert))] == e1  # seeded
    item = ds[0]
    np.testing.assert_allclose(item.target, adamson.X[targets[0]].toarray().ravel())
    assert cell_rng(4, 1, int(keys[0]), 0).integers(10) == cell_rng(4, 1, int(keys[0]), 0).integers(
        10
    )


def test_pairing_without_controls_is_input_error(adamson: ad.AnnData):
    with pytest.raises(InputError, match="no control cells"):
        PerturbationPairs(
            adamson.X,
            target_idx=np.array([0]),
            pert_cols=[np.array([1])],
            control_idx=np.array([], dtype=np.int64),
            keys=stable_cell_keys(adamson.obs_names),
        )


def test_inference_chunks_cover_every_gene_once_with_flag():
    pert = np.array([5, 77])
    chunks = inference_chunks(np.arange(160), pert, 40, np.random.default_rng(0))
    assert all(len(c) <= 40 and set(pert) <= set(c.tolist()) for c in chunks)
    rest = np.concatenate([np.setdiff1d(c, pert) for c in chunks])
    assert sorted(rest.tolist()) == sorted(set(range(160)) - {5, 77})


# ------------------------------------------------------------------ prediction clipping


def test_predictions_are_clipped_at_zero(adamson: ad.AnnData, adamson_dense: np.ndarray):
    """GEARS issue #30: a model whose raw output goes negative must not report negative
    log-expression."""
    from celltune.data.vocab import GeneVocab
    from celltune.model.config import ModelConfig
    from celltune.model.model import CellTransformer

    genes = adamson.var["gene_name"].astype(str).tolist()
    vocab = GeneVocab.from_genes(genes)
    torch.manual_seed(0)
    model = CellTransformer(
        ModelConfig(
            ntoken=len(vocab),
            pad_id=vocab.pad_id,
            d_model=16,
            nhead=2,
            d_hid=16,
            nlayers=1,
            generator=True,
            pert_pad_id=2,
            do_mvc=False,
            explicit_zero_prob=False,
            pad_value=0.0,
            decoder="affine",
        ),
        vocab=vocab,
    )
    gene_ids = np.asarray(vocab.match_genes(genes).ids, dtype=np.int64)
    controls = adamson_dense[:8]
    pert = np.array([_col(adamson, "HSPA5")])
    model.eval()
    flags = np.isin(np.arange(len(genes)), pert).astype(np.int64)

    def raw_output() -> np.ndarray:
        with torch.no_grad():
            return model(
                torch.as_tensor(gene_ids)[None].repeat(8, 1),
                torch.as_tensor(controls),
                pert_flags=torch.as_tensor(flags)[None].repeat(8, 1),
                padding_mask=torch.zeros(8, len(genes), dtype=torch.bool),
            )["mlm_output"].numpy()

    # shift the bias head by the untrained outputs' median so they straddle 0 whatever the
    # initialisation (both signs must be exercised)
    last_linear = [
        m for m in model.decoder.bias_decoder.modules() if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        last_linear[-1].bias -= float(np.median(raw_output()))
    raw = raw_output()
    assert (raw < 0).any(), "the untrained model should produce some negative outputs"
    assert (raw > 0).any()
    # one chunk (160 genes <= max_seq_len): same sequence as the raw call
    pred = predict_cells(model, controls, gene_ids, pert, max_seq_len=1536, batch_size=3)
    assert pred.shape == controls.shape
    assert (pred >= 0).all()
    np.testing.assert_allclose(pred, np.maximum(raw, 0), atol=1e-5)


# ------------------------------------------------------------------ bad input


def test_train_rejects_raw_counts_and_unprepared_files(papalexi_path: Path, adamson: ad.AnnData):
    raw = ad.read_h5ad(papalexi_path)
    raw.obs["split"] = "train"
    with pytest.raises(InputError, match="raw counts"):
        check_prepared(raw, "papalexi")
    with pytest.raises(InputError, match="perturb prepare"):
        check_prepared(adamson, "adamson mini (no split)")
    no_ctrl = adamson[adamson.obs["condition"].astype(str) != "ctrl"].copy()
    no_ctrl.obs["split"] = "train"
    with pytest.raises(InputError, match="no control cells"):
        check_prepared(no_ctrl, "adamson without controls")


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def adamson_run(tmp_path_factory: pytest.TempPathFactory, adamson: ad.AnnData) -> Path:
    """prepare → train on the Adamson mini file (GEARS format, log-normalised)."""
    root = tmp_path_factory.mktemp("adamson_run")
    prepared = prepare_perturbation_data(adamson, data_is_raw=False, split="simulation", seed=1)
    write_prepared(prepared, root / "data.h5ad")
    run = train_perturbation_model(root / "data.h5ad", root / "run", _tiny_config())
    assert run.info["n_unplaceable"] == 0
    return root / "run"


@pytest.mark.e2e
def test_adamson_train_writes_scgpt_run_dir(adamson_run: Path):
    for name in ("model/args.json", "model/vocab.json", "model/best_model.pt"):
        assert (adamson_run / name).is_file(), name
    hist = pd.read_csv(adamson_run / "history.csv")
    assert len(hist) == 2
    assert "val/pearson_delta" in hist.columns and hist["val/pearson_delta"].notna().all()
    args = json.loads((adamson_run / "model" / "args.json").read_text())
    assert args["generator"] is True
    assert (adamson_run / "config.yaml").is_file()


@pytest.mark.e2e
def test_adamson_predict_and_unknown_gene(adamson_run: Path, adamson: ad.AnnData):
    pred = predict_perturbations(adamson_run, ["HSPA5", "HSPA5+SEC61A1"], n_ctrl=30)
    assert list(pred.mean.index) == ["HSPA5+ctrl", "HSPA5+SEC61A1"]
    assert pred.mean.shape == (2, adamson.n_vars)
    assert (pred.mean.to_numpy() >= 0).all() and (pred.std.to_numpy() >= 0).all()
    assert np.isfinite(pred.mean.to_numpy()).all()
    with pytest.raises(InputError, match="NOTAGENE"):
        predict_perturbations(adamson_run, ["HSPA5", "NOTAGENE+HSPA5"], n_ctrl=5)
    with pytest.raises(InputError, match="not a gene"):
        predict_perturbations(adamson_run, ["A+B+C"], n_ctrl=5)


@pytest.mark.e2e
def test_resume_finished_run_is_a_no_op(adamson_run: Path, tmp_path: Path):
    before = load_run(adamson_run).model.state_dict()
    data = Path(json.loads((adamson_run / "run.json").read_text())["data"])
    with pytest.raises(InputError, match="--resume"):
        train_perturbation_model(data, adamson_run, _tiny_config())
    train_perturbation_model(data, adamson_run, _tiny_config(), resume=True)
    after = load_run(adamson_run).model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


# ------------------------------------------------------------------ Papalexi end to end


@pytest.fixture(scope="module")
def papalexi_run(tmp_path_factory: pytest.TempPathFactory, papalexi_path: Path) -> Path:
    """prepare → train on a seeded subsample of the real Papalexi ECCITE-seq file (raw
    counts, 299 genes; 16 of its 25 targets are not measured)."""
    raw = ad.read_h5ad(papalexi_path)
    cond = raw.obs["condition"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    keep = np.concatenate(
        [
            rng.choice(
                np.flatnonzero(cond == c),
                min(400 if c == "ctrl" else 50, (cond == c).sum()),
                replace=False,
            )
            for c in np.unique(cond)
        ]
    )
    sub = raw[np.sort(keep)].copy()
    root = tmp_path_factory.mktemp("papalexi_run")
    prepared = prepare_perturbation_data(sub, split="simulation", seed=1)
    write_prepared(prepared, root / "data.h5ad")
    cfg = _tiny_config(epochs=1)
    cfg.data.max_cells_per_condition = 30
    train_perturbation_model(root / "data.h5ad", root / "run", cfg)
    return root / "run"


@pytest.mark.e2e
def test_papalexi_unmeasured_targets_become_tokens(papalexi_run: Path):
    info = json.loads((papalexi_run / "run.json").read_text())
    assert info["n_genes"] == 299
    assert len(info["token_genes"]) == 16 and "IFNGR1" in info["token_genes"]
    assert "STAT1" not in info["token_genes"]
    assert info["n_unplaceable"] == 0
    # GEARS simulation split, seed 1: both val targets are unmeasured, so one of the 5
    # measured training perturbations is held out whole as an unseen validation perturbation
    assert "held out whole" in info["validation"]
    assert len(info["val_perturbations"]) == 1
    val_gene = info["val_perturbations"][0].split("+")[0]
    assert val_gene in {"CMTM6", "NFKBIA", "STAT1", "STAT2", "STAT3"}
    assert val_gene not in info["train_flagged_genes"]
    assert info["n_train_perturbations"] == 15
    assert "IFNGR1" in info["train_flagged_genes"] and "JAK2" not in info["train_flagged_genes"]


@pytest.mark.e2e
def test_papalexi_predict_measured_token_and_unknown(papalexi_run: Path, tmp_path: Path):
    from celltune.tasks.perturbation import write_prediction_csv

    pred = predict_perturbations(papalexi_run, ["STAT1", "JAK2+STAT1", "IFNGR1"], n_ctrl=20)
    assert pred.mean.shape == (3, 299)
    assert (pred.mean.to_numpy() >= 0).all()
    # the flag changes the prediction: a perturbed gene's prediction differs from control
    assert not np.allclose(pred.mean.loc["STAT1+ctrl"], pred.mean.loc["JAK2+STAT1"])
    path = write_prediction_csv(pred, tmp_path / "pred.csv")
    table = pd.read_csv(path)
    assert list(table.columns[:4]) == ["perturbation", "gene", "mean", "std"]
    assert len(table) == 3 * 299
    with pytest.raises(InputError, match=r"NOTAGENE, ALSONOT"):
        predict_perturbations(papalexi_run, ["NOTAGENE", "STAT1+ALSONOT"], n_ctrl=5)


@pytest.mark.e2e
def test_papalexi_evaluate_tables_and_report(papalexi_run: Path):
    from celltune.report.perturbation_run import evaluate_perturbation_run

    m = evaluate_perturbation_run(papalexi_run, n_ctrl=20, quiet=True)
    measured = m["scopes"]["measured"]
    # the 4 test targets that are measured genes: IFNGR2, JAK2, TNFRSF14, UBE2L6
    assert m["n_test_measured_targets"] == 4 and m["n_test_perturbations"] == 7
    assert set(measured) == {
        "celltune", "ctrl", "train_mean", "additive", "linear", "noise_ceiling"
    }  # fmt: skip
    # Train Mean predicts the training-perturbation mean: no signal in Systema's delta
    assert measured["train_mean"]["all"]["pearson_delta_pert_mean"] == 0.0
    assert 0.0 <= measured["celltune"]["all"]["discrimination_l1"] <= 1.0
    for name, summary in measured.items():
        assert summary["all"]["n_perturbations"] == 4, name
        assert "unseen_single" in summary["subgroups"]
    # by definition: no change has pearson_delta 0; one change for all has centred r 0
    assert measured["ctrl"]["all"]["pearson_delta"] == 0.0
    assert abs(measured["train_mean"]["all"]["pearson_delta_centered"]) < 1e-9
    assert "celltune" in m["scopes"]["all"]
    assert set(m["model_untrained_gene_predictions"]) == {"CUL3+ctrl", "IRF1+ctrl", "MARCH8+ctrl"}
    for name in (
        "metrics.json",
        "metrics_summary.csv",
        "report.html",
        "perturbation_delta_scatter.png",
        "perturbation_delta_similarity.png",
    ):
        assert (papalexi_run / name).is_file(), name
    assert list(papalexi_run.glob("perturbation_de_*.png"))
    table = pd.read_csv(papalexi_run / "metrics_summary.csv")
    assert {"pearson_delta", "pearson_de_delta", "scope", "method", "subgroup"} <= set(
        table.columns
    )
    html = (papalexi_run / "report.html").read_text()
    assert "celltune" in html and "train_mean" in html


def test_nonzero_inference_keeps_unexpressed_genes_and_predicts_flag(
    adamson: ad.AnnData, adamson_dense: np.ndarray
):
    """include_zero_gene='nonzero': a gene not expressed in the control (and not flagged)
    is not in the sequence and stays 0; the flagged gene is predicted even when zero."""
    from celltune.data.vocab import GeneVocab
    from celltune.model.config import ModelConfig
    from celltune.model.model import CellTransformer

    genes = adamson.var["gene_name"].astype(str).tolist()
    vocab = GeneVocab.from_genes(genes)
    torch.manual_seed(1)
    model = CellTransformer(
        ModelConfig(
            ntoken=len(vocab),
            pad_id=vocab.pad_id,
            d_model=16,
            nhead=2,
            d_hid=16,
            nlayers=1,
            generator=True,
            pert_pad_id=2,
            do_mvc=False,
            explicit_zero_prob=False,
            pad_value=0.0,
            decoder="affine",
        ),
        vocab=vocab,
    )
    with torch.no_grad():  # outputs > 0 everywhere, so a 0 can only come from "not run"
        [m for m in model.decoder.bias_decoder.modules() if isinstance(m, torch.nn.Linear)][
            -1
        ].bias += 5.0
    gene_ids = np.asarray(vocab.match_genes(genes).ids, dtype=np.int64)
    controls = adamson_dense[:6]
    zero_in_all = np.flatnonzero((controls == 0).all(axis=0))
    flagged = int(zero_in_all[0])
    pred = predict_cells(
        model,
        controls,
        gene_ids,
        np.array([flagged]),
        max_seq_len=50,
        include_zero_gene="nonzero",
        batch_size=4,
    )
    assert (pred[:, flagged] > 0).all()
    rest = np.setdiff1d(zero_in_all, [flagged])
    assert (pred[:, rest] == 0).all()
    expressed = controls != 0
    assert (pred[expressed] > 0).all()


@pytest.mark.e2e
def test_pretrained_loads_only_trunk_and_maps_genes(
    tmp_path: Path, adamson: ad.AnnData, fixtures_dir: Path
):
    """--pretrained: a real scGPT TransformerGenerator checkpoint (fixture) gives the sizes;
    only encoder / value_encoder / transformer_encoder are loaded; genes are matched to its
    vocabulary by symbol and perturbations of genes outside it are left out, counted."""
    from celltune.model.checkpoint import read_state_dict

    pre = fixtures_dir / "fixture_generator"
    prepared = prepare_perturbation_data(adamson, data_is_raw=False, split="simulation", seed=1)
    write_prepared(prepared, tmp_path / "data.h5ad")
    cfg = _tiny_config(epochs=1)
    cfg.model.pretrained = str(pre)
    run = train_perturbation_model(tmp_path / "data.h5ad", tmp_path / "run", cfg)
    vocab = json.loads((pre / "vocab.json").read_text())
    symbols = set(adamson.var["gene_name"].astype(str))
    assert run.info["n_genes"] == len(symbols & set(vocab)) == 22
    trunk = [
        k
        for k in read_state_dict(pre / "best_model.pt")
        if k.split(".")[0] in ("encoder", "value_encoder", "transformer_encoder")
    ]
    assert run.info["pretrained_loaded"] == len(trunk) > 0
    # HSPA5 and SEC61A1 are in the vocabulary; the 8 other targets are not
    assert run.info["n_unplaceable"] == 8
    args = json.loads((tmp_path / "run" / "model" / "args.json").read_text())
    assert args["embsize"] == 32 and args["nlayers"] == 2 and args["generator"] is True
    pred = predict_perturbations(tmp_path / "run", ["SEC61A1"], n_ctrl=10)
    assert pred.mean.shape == (1, 22)


@pytest.mark.e2e
def test_papalexi_exclude_mode_counts_left_out_perturbations(papalexi_run: Path, tmp_path: Path):
    """data.unmeasured_targets='exclude': the 16 unmeasured-target perturbations are left
    out of training and counted; only measured-gene perturbations train the model."""
    cfg = _tiny_config(epochs=1, max_steps_per_epoch=2)
    cfg.data.unmeasured_targets = "exclude"
    cfg.data.max_cells_per_condition = 30
    run = train_perturbation_model(papalexi_run.parent / "data.h5ad", tmp_path / "run", cfg)
    assert run.info["token_genes"] == []
    assert run.info["n_unplaceable"] == 16
    assert "IFNGR1+ctrl" in run.info["unplaceable_perturbations"]
    # 5 measured training perturbations, one of them held out whole for validation
    assert run.info["n_train_perturbations"] == 4
    assert set(run.info["train_flagged_genes"]) < {"CMTM6", "NFKBIA", "STAT1", "STAT2", "STAT3"}
    with pytest.raises(InputError, match="IFNGR1"):
        predict_perturbations(tmp_path / "run", ["IFNGR1"], n_ctrl=5)


@pytest.mark.e2e
def test_cli_train_predict_evaluate_and_errors(
    tmp_path: Path, adamson: ad.AnnData, adamson_mini_path: Path, capsys: pytest.CaptureFixture[str]
):
    """The documented commands, through the real CLI: flags reach the config, bad input
    ends in one 'Error:' line with exit code 2, the outputs appear."""
    from typer.testing import CliRunner

    from celltune.cli.main import app

    prepared = prepare_perturbation_data(adamson, data_is_raw=False, split="simulation", seed=1)
    write_prepared(prepared, tmp_path / "data.h5ad")
    runner = CliRunner()
    args = [
        "perturb",
        "train",
        str(tmp_path / "data.h5ad"),
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(Path(__file__).resolve().parents[1] / "examples" / "perturb.yaml"),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--max-seq-len",
        "64",
        "--seed",
        "3",
        "--include-zero-gene",
        "nonzero",
        "--device",
        "cpu",
        "--quiet",
        "--set",
        "model.d_model=16",
        "--set",
        "model.d_hid=16",
        "--set",
        "model.nlayers=1",
        "--set",
        "data.n_eval_ctrl=20",
        "--set",
        "data.control_pool=40",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "max_seq_len: 64" in cfg and "include_zero_gene: nonzero" in cfg and "seed: 3" in cfg
    res = runner.invoke(
        app,
        [
            "perturb",
            "predict",
            str(tmp_path / "run"),
            "--perturbations",
            "HSPA5",
            "HSPA5+SEC61A1",
            "--n-ctrl",
            "10",
            "--out",
            str(tmp_path / "pred.csv"),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert set(pd.read_csv(tmp_path / "pred.csv")["perturbation"]) == {
        "HSPA5+ctrl",
        "HSPA5+SEC61A1",
    }
    res = runner.invoke(app, ["perturb", "evaluate", str(tmp_path / "run"), "--n-ctrl", "10", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "report.html").is_file()

    # bad input: an unprepared (raw GEARS mini, no split) file; an unknown gene
    from celltune.cli.main import main

    for argv, needle in (
        (
            ["perturb", "train", str(adamson_mini_path), "--out", str(tmp_path / "bad")],
            "perturb prepare",
        ),
        (
            [
                "perturb",
                "predict",
                str(tmp_path / "run"),
                "--perturbations",
                "NOPE",
                "--out",
                str(tmp_path / "x.csv"),
            ],
            "NOPE",
        ),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("Error:") and needle in err, err
