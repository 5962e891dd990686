"""integration_verdict and the embedding health checks on real data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

from celltune.eval.embedding_checks import length_correlation, participation_ratio
from celltune.eval.integration_verdict import integration_verdict


def _row(bio, batch):
    return {"scib_bio": bio, "scib_batch": batch, "scib_total": 0.6 * bio + 0.4 * batch}


def test_verdict_says_when_celltune_loses_to_pca():
    m = {"celltune": _row(0.4, 0.3), "pca": _row(0.6, 0.4), "harmony": _row(0.65, 0.6)}
    text = integration_verdict(m)
    assert "does NOT improve" in text and "Try:" in text
    assert "less well" in text


def test_verdict_when_celltune_wins():
    m = {"celltune": _row(0.7, 0.7), "pca": _row(0.6, 0.4), "scvi": {"skipped": "x"}}
    text = integration_verdict(m)
    assert "NOT" not in text
    assert "mixes batches better than" in text and "(better)" in text


def test_verdict_without_metrics():
    assert integration_verdict({"celltune": {"skipped": "no --label-key"}}).startswith(
        "No verdict: no --label-key"
    )


@pytest.fixture(scope="module")
def kang(kang_stim_path):
    a = ad.read_h5ad(kang_stim_path)
    n_expr = np.diff(a.X.indptr)
    sc.pp.normalize_total(a, 1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=30)
    return a.obsm["X_pca"], n_expr


def test_checks_flag_a_length_embedding_and_pass_pca(kang):
    pca, n_expr = kang
    # An embedding that only encodes sequence length (the issue-16 collapse) ...
    rng = np.random.default_rng(0)
    collapsed = np.outer(n_expr, rng.normal(size=30)) + rng.normal(scale=1.0, size=pca.shape)
    assert participation_ratio(collapsed) < 1.5
    assert length_correlation(collapsed, n_expr) > 0.9
    # ... and PCA of the log-normalised real cells, which spreads over many directions.
    assert participation_ratio(pca) > 3
    assert length_correlation(pca, n_expr) < length_correlation(collapsed, n_expr)


@pytest.fixture(scope="module")
def kang_expr(kang_stim_path):
    a = ad.read_h5ad(kang_stim_path)[::3].copy()  # both batches (the file is sorted)
    sc.pp.normalize_total(a, 1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=300)
    x = a[:, a.var["highly_variable"]].X.toarray()
    return x, a.obs["batch"].astype(str).to_numpy()


def test_health_scores_separate_mixed_apart_and_collapsed(kang_expr):
    from celltune.train.embedding_health import (
        batch_mixing,
        embedding_health,
        expression_pca,
        neighbour_preservation,
    )

    x, batches = kang_expr
    pca = expression_pca(x)
    rng = np.random.default_rng(0)
    # the expression PCA keeps its own neighbourhoods; noise keeps almost none
    assert neighbour_preservation(pca, pca) == pytest.approx(1.0)
    assert neighbour_preservation(rng.normal(size=pca.shape), pca) < 0.1
    # an embedding that is the batch label (plus a little noise) does not mix; noise mixes
    onehot = (batches[:, None] == np.unique(batches)[None]).astype(float) * 10
    assert batch_mixing(onehot + rng.normal(scale=0.1, size=onehot.shape), batches) < 0.05
    assert batch_mixing(rng.normal(size=(len(batches), 16)), batches) > 0.8
    # real ctrl vs stimulated PBMCs: the PCA separates the batches partly
    assert 0.05 < batch_mixing(pca, batches) < 0.9
    h = embedding_health(onehot, batches, x)
    assert set(h) == {"pr", "mixing", "preserve"} and h["pr"] < 1.5
