"""GEARS-format data preparation: conditions, DE-gene definitions, splits, real files."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from celltune.cli.main import app
from celltune.data import gears
from celltune.errors import InputError


@pytest.fixture(scope="module")
def papalexi_small(papalexi_path) -> ad.AnnData:
    """3 of 4 cells dropped, stratified by nothing: every condition still has cells."""
    full = ad.read_h5ad(papalexi_path)
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(full.n_obs, 3000, replace=False))
    return full[keep].copy()


# ---------------------------------------------------------------- conditions


def test_parse_condition() -> None:
    assert gears.parse_condition("ctrl") == ()
    assert gears.parse_condition("FEV+ctrl") == ("FEV",)
    assert gears.parse_condition("ctrl+FEV") == ("FEV",)
    assert gears.parse_condition("FEV+SAMD11") == ("FEV", "SAMD11")


def test_normalize_conditions_maps_control_and_orders_single() -> None:
    out = gears.normalize_conditions(
        ["non-targeting", "A+ctrl", "ctrl+B", "A+B"], control="non-targeting"
    )
    assert out.tolist() == ["ctrl", "A+ctrl", "B+ctrl", "A+B"]
    bare = gears.normalize_conditions(["ctrl", "A"], bare_as_single=True)
    assert bare.tolist() == ["ctrl", "A+ctrl"]


@pytest.mark.parametrize("bad", ["control", "non-targeting", "A", "A+B+C", "A+", "ctrl+ctrl"])
def test_normalize_conditions_rejects_non_gears_values(bad: str) -> None:
    with pytest.raises(InputError) as err:
        gears.normalize_conditions(["ctrl", "X+ctrl", bad])
    assert repr(bad) in str(err.value)
    assert "Fix:" in str(err.value)


def test_control_like_value_is_not_read_as_gene_even_with_bare_as_single() -> None:
    with pytest.raises(InputError, match="--control 'control'"):
        gears.normalize_conditions(["control", "A"], bare_as_single=True)


def test_no_control_cells_is_an_error() -> None:
    with pytest.raises(InputError, match="no control cells"):
        gears.normalize_conditions(["A+ctrl", "B+ctrl"])


# ---------------------------------------------------------------- DE definitions


def _hand_made() -> ad.AnnData:
    """6 ctrl + 6 'P+ctrl' cells, 5 genes whose non-zero / dropout status is known.

    g0: expressed in both (non-zero); g1: expressed in ctrl only (a dropout);
    g2: zero everywhere (a true zero); g3: expressed in P only; g4: both, shifted.
    """
    rng = np.random.default_rng(3)
    ctrl = np.column_stack(
        [
            rng.uniform(1, 2, 6),
            rng.uniform(1, 2, 6),
            np.zeros(6),
            np.zeros(6),
            rng.uniform(0.5, 1, 6),
        ]
    )
    pert = np.column_stack(
        [
            rng.uniform(1.2, 2.2, 6),
            np.zeros(6),
            np.zeros(6),
            rng.uniform(2, 3, 6),
            rng.uniform(2, 2.5, 6),
        ]
    )
    X = sp.csr_matrix(np.vstack([ctrl, pert]).astype(np.float32))
    obs = pd.DataFrame(
        {"condition": ["ctrl"] * 6 + ["P+ctrl"] * 6, "cell_type": "K"},
        index=[f"c{i}" for i in range(12)],
    )
    var = pd.DataFrame(
        {"gene_name": [f"G{i}" for i in range(5)]}, index=[f"E{i}" for i in range(5)]
    )
    adata = ad.AnnData(X=X, obs=obs, var=var)
    gears.add_gears_obs(adata)
    return adata


def _welch_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    va, vb = a.var(0, ddof=1), b.var(0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (a.mean(0) - b.mean(0)) / np.sqrt(va / len(a) + vb / len(b))
    return np.nan_to_num(t)


def test_gears_obs_columns_match_perturbation_md() -> None:
    adata = _hand_made()
    row_c = adata.obs.iloc[0]
    row_p = adata.obs.iloc[-1]
    assert (row_c["dose_val"], row_c["control"], row_c["condition_name"]) == ("1", 1, "K_ctrl_1")
    assert (row_p["dose_val"], row_p["control"], row_p["condition_name"]) == (
        "1+1",
        0,
        "K_P+ctrl_1+1",
    )


def test_de_gene_definitions_on_known_answer() -> None:
    adata = _hand_made()
    de = gears.compute_de_genes(adata)
    key = "K_P+ctrl_1+1"
    assert list(de["rank_genes_groups_cov_all"]) == [key]
    assert de["non_zeros_gene_idx"][key].tolist() == [0, 3, 4]
    assert de["non_dropout_gene_idx"][key].tolist() == [0, 2, 3, 4]  # g1 is the dropout
    # ranking: by |Welch t| of P vs ctrl, computed directly
    dense = adata.X.toarray()
    t = _welch_t(dense[6:], dense[:6])
    expected = np.asarray(adata.var_names)[np.argsort(-np.abs(t), kind="stable")]
    ranked = de["rank_genes_groups_cov_all"][key]
    assert ranked[:3].tolist() == expected[:3].tolist()
    assert set(ranked) == set(adata.var_names)
    nd = set(adata.var_names[[0, 2, 3, 4]])
    nz = set(adata.var_names[[0, 3, 4]])
    assert de["top_non_dropout_de_20"][key].tolist() == [g for g in ranked if g in nd]
    assert de["top_non_zero_de_20"][key].tolist() == [g for g in ranked if g in nz]
    for k in gears.DE_KEYS:
        assert k in adata.uns


def test_adamson_processed_file_accepted_as_is_and_de_agreement(adamson_mini_path, tmp_path):
    raw = ad.read_h5ad(adamson_mini_path)
    out = gears.prepare_perturbation_data(raw)
    assert out.shape == raw.shape  # no renormalisation / HVG on a GEARS file
    np.testing.assert_array_equal(out.X.toarray(), raw.X.toarray())
    assert len(out.uns["rank_genes_groups_cov_all"]) == 10
    for name, top in out.uns["top_non_dropout_de_20"].items():
        assert len(top) == 20 and name.startswith("K562(?)_")
    # store the computed keys in the file, read back: a consistent file passes the check
    stored = raw.copy()
    for k in gears.DE_KEYS:
        stored.uns[k] = out.uns[k]
    path = tmp_path / "with_de.h5ad"
    gears.write_prepared(stored, path)
    again = gears.prepare_perturbation_data(ad.read_h5ad(path))
    assert gears.check_de_agreement(stored.uns, {k: again.uns[k] for k in gears.DE_KEYS}) == []
    # a tampered list is caught and named
    cond = sorted(stored.uns["top_non_dropout_de_20"])[0]
    lst = np.asarray(stored.uns["top_non_dropout_de_20"][cond]).copy()
    lst[[0, 1]] = lst[[1, 0]]
    stored.uns["top_non_dropout_de_20"][cond] = lst
    with pytest.raises(InputError, match=r"disagree.*" + cond.replace("(", r"\(").split("?")[0]):
        gears.prepare_perturbation_data(stored)


def test_load_prepared_computes_missing_de_keys(adamson_mini_path) -> None:
    adata = gears.load_prepared(adamson_mini_path)
    assert all(k in adata.uns for k in gears.DE_KEYS)
    assert set(gears.parse_condition(c)[0] for c in adata.obs["condition"] if c != "ctrl") <= set(
        adata.var["gene_name"]
    )


# ---------------------------------------------------------------- raw / normalised detection


def test_log_data_given_as_raw_is_an_error(adamson_mini_path) -> None:
    adata = ad.read_h5ad(adamson_mini_path)
    del adata.obs["condition_name"]  # no longer recognisable as a GEARS file
    with pytest.raises(InputError, match="--not-raw"):
        gears.prepare_perturbation_data(adata)
    out = gears.prepare_perturbation_data(adata, data_is_raw=False)
    np.testing.assert_array_equal(out.X.toarray(), adata.X.toarray())


def test_counts_given_as_not_raw_is_an_error(papalexi_small) -> None:
    with pytest.raises(InputError, match="drop --not-raw"):
        gears.prepare_perturbation_data(papalexi_small, data_is_raw=False)


# ---------------------------------------------------------------- splits


def _conditions() -> list[str]:
    singles = [f"G{i}+ctrl" for i in range(12)]
    combos = [f"G{i}+G{j}" for i in range(12) for j in range(i + 1, 12) if (i + j) % 3 == 0]
    return ["ctrl", *singles, *combos]


def test_simulation_split_follows_gears_procedure() -> None:
    conds = _conditions()
    res = gears.split_conditions(conds, "simulation", seed=1)
    perts = [c for c in conds if c != "ctrl"]
    # a partition of the perturbations, ctrl in train
    assert sorted(res.train + res.val + res.test) == sorted(perts)
    assert res.assignment()["ctrl"] == "train"
    # the training genes are GEARS' numpy global-seed draw of 75% of the sorted genes
    genes = np.unique([g for c in perts for g in gears.parse_condition(c)])
    np.random.seed(1)
    drawn = set(np.random.choice(genes, int(len(genes) * 0.75), replace=False).tolist())
    seen_singles = {gears.parse_condition(c)[0] for c in res.train + res.val if "ctrl" in c}
    assert seen_singles == drawn
    # subgroups partition the test set and are classified by how many genes were seen
    sub = res.test_subgroup
    assert sorted(c for v in sub.values() for c in v) == sorted(res.test)
    for c in sub["unseen_single"]:
        assert gears.parse_condition(c)[0] not in drawn
    for k in (0, 1, 2):
        for c in sub[f"combo_seen{k}"]:
            assert sum(g in drawn for g in gears.parse_condition(c)) == k
    both_seen = [c for c in perts if "ctrl" not in c and set(gears.parse_condition(c)) <= drawn]
    assert len(both_seen) - len(sub["combo_seen2"]) == int(len(both_seen) * 0.75)
    # deterministic per seed, different across seeds
    assert gears.split_conditions(conds, "simulation", seed=1).test == res.test
    assert gears.split_conditions(conds, "simulation", seed=2).test != res.test


@pytest.mark.parametrize(
    "split", ["simulation_single", "single", "combo", "combo_seen0", "combo_seen1", "combo_seen2"]
)
def test_other_splits_partition_and_have_test(split: str) -> None:
    conds = _conditions()
    res = gears.split_conditions(conds, split, seed=3, test_size=0.3)
    groups = [set(res.train), set(res.val), set(res.test), set(res.excluded)]
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # disjoint
    assert res.test
    if split in ("simulation_single", "single"):
        assert all("ctrl" in c for c in res.test)
    if split == "combo_seen2":
        assert all("ctrl" not in c for c in res.test)
    if split == "combo":
        assert res.test == gears.split_conditions(conds, "combo_seen0", 3, test_size=0.3).test


def test_no_test_split_and_empty_test_error() -> None:
    conds = _conditions()
    res = gears.split_conditions(conds, "no_test", seed=1)
    assert res.test == []
    with pytest.raises(InputError, match="no test perturbation"):
        gears.split_conditions(conds, "simulation_single", train_gene_set_size=1.0)
    with pytest.raises(InputError, match="unknown split"):
        gears.split_conditions(conds, "random")


# ---------------------------------------------------------------- real raw data


def test_prepare_papalexi(papalexi_small) -> None:
    out = gears.prepare_perturbation_data(papalexi_small, n_hvg=50, split="simulation")
    targets = {g for c in out.obs["condition"].unique() for g in gears.parse_condition(c)}
    measured = targets & set(papalexi_small.var["gene_name"])
    assert len(measured) == 9
    assert measured <= set(out.var["gene_name"])  # perturbed genes kept beyond the 50 HVGs
    assert out.n_vars == len(set(out.var_names))
    assert 50 <= out.n_vars <= 59
    assert out.uns["perturbed_genes_missing"].tolist() == sorted(targets - measured)
    # normalised (total counts over all genes, scanpy's median target) + log1p
    totals = np.asarray(papalexi_small.X.sum(1)).ravel()
    scale = np.median(totals) / totals
    counts = out.layers["counts"].toarray()
    expected = np.log1p(counts * scale[:, None])
    np.testing.assert_allclose(out.X.toarray(), expected, rtol=1e-4, atol=1e-5)
    obs = out.obs
    i = np.flatnonzero(obs["condition"] == "STAT1+ctrl")[0]
    assert obs["condition_name"].iloc[i] == "THP-1_STAT1+ctrl_1+1"
    assert (obs.loc[obs["condition"] == "ctrl", "control"] == 1).all()
    assert (obs.loc[obs["condition"] != "ctrl", "dose_val"] == "1+1").all()
    assert set(obs["split"]) == {"train", "val", "test"}
    assert set(out.uns["split_subgroups"].values()) == {"unseen_single"}
    json.dumps(dict(out.uns["split_subgroups"]))
    assert out.uns["celltune"]["perturb_prepare"]["split"] == "simulation"
    assert len(out.uns["top_non_dropout_de_20"]) == 25


def test_cli_prepare_roundtrip(papalexi_small, tmp_path) -> None:
    raw = tmp_path / "raw.h5ad"
    papalexi_small.write_h5ad(raw)
    out = tmp_path / "data.h5ad"
    res = CliRunner().invoke(
        app,
        ["perturb", "prepare", str(raw), "--out", str(out), "--n-hvg", "100", "--seed", "2"],
    )
    assert res.exit_code == 0, res.output
    assert "unseen_single" in res.output
    data = gears.load_prepared(out)
    assert data.uns["celltune"]["perturb_prepare"]["seed"] == 2
    assert "test" in set(data.obs["split"])
    import h5py

    with h5py.File(out) as f:  # written gzip-compressed
        x = f["X"] if isinstance(f["X"], h5py.Dataset) else f["X/data"]
        assert x.compression == "gzip"
    bad = CliRunner().invoke(
        app, ["perturb", "prepare", str(raw), "--out", str(out), "--condition-key", "perturbation"]
    )
    assert bad.exit_code == 2
    assert "--control 'control'" in bad.output
