"""Systematic variation (Systema) and the split-half Pearson-delta ceiling for `stats`."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celltune.analysis.perturbation_systematic import systematic_variation


def test_shared_change_is_systematic_and_matches_direct_leave_one_out():
    rng = np.random.default_rng(0)
    n_genes, shared = 30, rng.normal(0, 1, 30)
    ctrl = rng.gamma(2, 1, (20, n_genes))
    groups = ["ctrl", "A+ctrl", "B+ctrl", "C+ctrl", "D+ctrl"]
    blocks, codes = [ctrl], [np.zeros(20, int)]
    own = {}
    for i in range(1, 5):
        own[i] = rng.normal(0, 0.3, n_genes)
        blocks.append(ctrl.mean(0) + shared + own[i] + rng.normal(0, 0.1, (6, n_genes)))
        codes.append(np.full(6, i))
    blocks.append(ctrl.mean(0)[None, :] + 5.0)  # one single-cell perturbation
    codes.append(np.array([5]))
    X, codes = np.vstack(blocks), np.concatenate(codes)
    table, summary = systematic_variation(X, codes, [*groups, "E+ctrl"])
    table = table.set_index("perturbation")
    assert (table.loc[groups[1:], "systematic_r"] > 0.8).all()
    # direct: delta of A against the mean delta of the others
    c = X[codes == 0].mean(0)
    d = np.stack([X[codes == i].mean(0) - c for i in range(1, 6)])
    want = np.corrcoef(d[0], d[1:].mean(0))[0, 1]
    assert table.loc["A+ctrl", "systematic_r"] == pytest.approx(want)
    assert np.isnan(table.loc["E+ctrl", "split_half_pearson_delta"])
    assert table.loc["A+ctrl", "split_half_pearson_delta"] > 0.9
    assert "systematic variation" in summary["reading"]


def test_stats_adds_columns_on_adamson(adamson_mini_path: Path):
    from celltune.analysis.perturbation_stats import compute_perturbation_stats

    res = compute_perturbation_stats(ad.read_h5ad(adamson_mini_path), methods=["t-test"])
    per = res.per_perturbation
    assert {"systematic_r", "split_half_pearson_delta"} <= set(per.columns)
    assert pd.notna(per["split_half_pearson_delta"]).all()
    assert res.summary["systematic_variation"]["n_perturbations"] == len(per)
