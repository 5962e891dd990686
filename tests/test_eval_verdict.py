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
