"""Annotation and reference mapping on the real Kang ctrl/stim PBMC file: ctrl cells are
the reference, stim cells the query (another condition, the same donors)."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from celltune.cli.main import app
from celltune.errors import InputError
from celltune.eval.annotation import score_annotation
from celltune.tasks.annotation import (
    CONFIDENCE_KEY,
    LABEL_KEY,
    PROBA_KEY,
    UNKNOWN,
    predict_labels,
    train_annotation,
)
from celltune.tasks.annotation.data import balanced_batch_sampler, match_query_genes
from celltune.tasks.annotation.predict import assign_labels, knn_transfer

runner = CliRunner()
TINY = {
    "d_model": 32,
    "nhead": 2,
    "d_hid": 32,
    "nlayers": 1,
    "nlayers_cls": 2,
    "max_seq_len": 64,
    "train": {"epochs": 1, "lr": 1e-3, "max_steps_per_epoch": 4, "quiet": True, "device": "cpu"},
}


@pytest.fixture(scope="module")
def kang(kang_stim_path):
    a = ad.read_h5ad(kang_stim_path)
    ref = a[a.obs["batch"] == "ctrl"].copy()
    query = a[a.obs["batch"] == "stim"][::4].copy()
    return ref, query


@pytest.fixture(scope="module")
def trained(kang, tmp_path_factory):
    ref, _ = kang
    out = tmp_path_factory.mktemp("annot")
    return train_annotation(ref, {**TINY, "label_key": "cell_type"}, out)


def test_model_directory_is_scgpt_format_with_labels(trained, kang):
    mdir = trained.model_dir
    for name in ("args.json", "vocab.json", "best_model.pt", "labels.json"):
        assert (mdir / name).is_file(), name
    labels = json.loads((mdir / "labels.json").read_text())
    assert labels == sorted(kang[0].obs["cell_type"].astype(str).unique())
    assert "val/macro_f1" in trained.history.columns


def test_predict_writes_labels_confidence_and_probabilities(trained, kang):
    _, query = kang
    out = predict_labels(query, trained.model_dir, device="cpu")
    proba = out.obsm[PROBA_KEY]
    assert proba.shape == (query.n_obs, len(trained.labels))
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.obs[CONFIDENCE_KEY], proba.max(1), atol=1e-6)
    best = np.asarray(trained.labels)[proba.argmax(1)]
    assert (out.obs[LABEL_KEY].astype(str).to_numpy() == best).all()


def test_unknown_below_min_confidence(trained, kang):
    _, query = kang
    free = predict_labels(query, trained.model_dir, device="cpu")
    conf = free.obs[CONFIDENCE_KEY].to_numpy()
    thr = float(np.median(conf))
    cut = predict_labels(query, trained.model_dir, device="cpu", min_confidence=thr)
    lab = cut.obs[LABEL_KEY].astype(str).to_numpy()
    assert (lab[conf < thr] == UNKNOWN).all() and (conf < thr).any()
    keep = conf >= thr
    assert (lab[keep] == free.obs[LABEL_KEY].astype(str).to_numpy()[keep]).all()
    # and directly: confidence exactly at the threshold keeps its label
    cat = assign_labels(["a", "b"], np.array([0, 1, 1]), np.array([0.5, 0.49, 0.9]), 0.5)
    assert list(cat) == ["a", UNKNOWN, "b"]


def test_missing_label_column_lists_the_columns(kang):
    with pytest.raises(InputError, match="sample_id"):
        train_annotation(kang[0], {**TINY, "label_key": "celltype"})


def test_nan_labels_and_tiny_classes_are_warned(kang, caplog):
    from celltune.tasks.annotation.config import AnnotationConfig
    from celltune.tasks.annotation.data import check_reference

    ref = kang[0].copy()
    lab = ref.obs["cell_type"].astype(object).to_numpy()
    lab[:7] = np.nan
    lab[7:10] = "rare type"
    ref.obs["cell_type"] = pd.Categorical(lab)
    with caplog.at_level(logging.WARNING, logger="celltune"):
        sub = check_reference(ref, AnnotationConfig(label_key="cell_type"))
    assert sub.n_obs == ref.n_obs - 7
    assert "7 of" in caplog.text and "rare type (3)" in caplog.text


def test_query_only_labels_and_nan_are_reported_not_scored():
    true = ["a", "a", "b", "new", "new", None]
    pred = ["a", "b", "b", "a", "b", "a"]
    s = score_annotation(true, pred, ["a", "b"])
    assert s.n_scored == 3 and s.n_unlabelled == 1
    assert s.query_only["new"]["n"] == 2
    assert s.accuracy == pytest.approx(2 / 3)


def test_low_gene_overlap_reports_the_count(caplog):
    with caplog.at_level(logging.WARNING, logger="celltune"):
        cols, pos = match_query_genes(["G1", "X", "Y"], ["G1", "G2", "G3", "G4"])
    assert list(pos) == [0] and list(cols) == [0]
    assert "only 1 of the model's 4 genes" in caplog.text
    with pytest.raises(InputError, match="none of the model"):
        match_query_genes(["X"], ["G1"])


def test_balanced_sampler_draws_classes_equally():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    sampler = balanced_batch_sampler(labels, 50, seed=0)
    drawn = np.concatenate([labels[b] for b in sampler])
    share = np.bincount(drawn, minlength=3) / drawn.size
    assert drawn.size == labels.size
    assert np.all(np.abs(share - 1 / 3) < 0.06), share


def test_knn_confidence_falls_with_distance():
    rng = np.random.default_rng(0)
    ref = np.vstack([rng.normal(0, 0.1, (50, 4)), rng.normal(3, 0.1, (50, 4))])
    labels = np.array(["x"] * 50 + ["y"] * 50)
    query = np.array([[0, 0, 0, 0], [3, 3, 3, 3], [30, 30, 30, 30]], dtype=float)
    classes, best, conf, _ = knn_transfer(ref, labels, query, k=5)
    assert [classes[i] for i in best[:2]] == ["x", "y"]
    assert conf[2] < 0.01 < conf[0]


@pytest.mark.e2e
def test_cli_train_predict_evaluate_map(kang, tmp_path):
    ref, query = kang
    ref_p, q_p = tmp_path / "ref.h5ad", tmp_path / "query.h5ad"
    ref.write_h5ad(ref_p)
    query.write_h5ad(q_p)
    run = tmp_path / "run"
    args = ["annotate", "train", str(ref_p), "--label-key", "cell_type", "--out", str(run)]
    small = ["--epochs", "1", "--max-steps-per-epoch", "3", "--d-model", "32", "--nlayers", "1"]
    res = runner.invoke(app, [*args, *small, "--max-seq-len", "64", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    # resume continues the same run for one more epoch
    more = [*args, "--epochs", "2", "--max-steps-per-epoch", "3", "--d-model", "32"]
    res = runner.invoke(app, [*more, "--nlayers", "1", "--max-seq-len", "64", "--resume", "-q"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(run / "history.csv")) == 2

    pred = tmp_path / "pred.h5ad"
    res = runner.invoke(
        app, ["annotate", "predict", str(q_p), "--model", str(run / "model"), "--out", str(pred)]
    )
    assert res.exit_code == 0, res.output
    out = ad.read_h5ad(pred)
    metrics = json.loads((tmp_path / "pred_report" / "metrics.json").read_text())
    acc = (out.obs[LABEL_KEY].astype(str) == out.obs["cell_type"].astype(str)).mean()
    assert metrics["accuracy"] == pytest.approx(acc)
    assert (tmp_path / "pred_report" / "report.html").stat().st_size > 1000

    rep = tmp_path / "rep"
    res = runner.invoke(
        app, ["annotate", "evaluate", str(pred), "--label-key", "cell_type", "--out", str(rep)]
    )
    assert res.exit_code == 0, res.output
    assert (rep / "confusion.png").is_file() and (rep / "per_class.csv").is_file()

    mapped = tmp_path / "mapped.h5ad"
    res = runner.invoke(
        app,
        [
            *["map", str(q_p), "--reference", str(ref_p), "--model", str(run / "model")],
            *["--label-key", "cell_type", "--out", str(mapped), "--min-confidence", "0.2"],
        ],
    )
    assert res.exit_code == 0, res.output
    m = ad.read_h5ad(mapped)
    allowed = set(ref.obs["cell_type"].astype(str)) | {UNKNOWN}
    assert set(m.obs[LABEL_KEY].astype(str)) <= allowed
    low = m.obs[CONFIDENCE_KEY].to_numpy() < 0.2
    assert (m.obs[LABEL_KEY].astype(str).to_numpy()[low] == UNKNOWN).all()

    bad = runner.invoke(app, [*args[:3], "--label-key", "nope", "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, InputError) and "cell_type" in str(bad.exception)


def test_pretrained_trunk_is_loaded_and_head_is_new(kang, fixtures_dir, tmp_path):
    from celltune.model.checkpoint import load_model

    pre_dir = fixtures_dir / "fixture_integration"
    pre = load_model(pre_dir)
    ref = kang[0][::3].copy()
    cfg = {**TINY, "label_key": "cell_type", "pretrained": str(pre_dir)}
    cfg["train"] = {**TINY["train"], "max_steps_per_epoch": 1, "lr": 1e-12}
    res = train_annotation(ref, cfg, tmp_path)
    assert res.model.config.d_model == pre.config.d_model
    assert res.model.config.n_cls == len(res.labels)
    name = "transformer_encoder.layers.0.linear1.weight"
    a, b = res.model.state_dict()[name], pre.state_dict()[name]
    assert float((a - b).abs().max()) < 1e-6  # lr≈0: the loaded trunk is unchanged
    assert len(res.model.vocab) == len(pre.vocab)
