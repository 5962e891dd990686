"""``celltune pretrain`` (issue 11, item 1) on the shipped Kang 2018 PBMC files.

A tiny model (d_model 32, one layer) pretrains on ~150 cells of each of two files; the
run is resumed through the CLI, continued with ``--init`` on a third file (vocabulary
extended), and fine-tuned with ``celltune integrate --pretrained`` on that third file.
Bad input (a vocabulary of the wrong naming, files of disjoint gene sets, missing files)
must fail with one clear line and exit status 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celltune.data.io import read_h5ad
from celltune.data.vocab import GeneVocab
from celltune.errors import InputError
from celltune.tasks.pretrain import MODEL_DIR, name_kind, pretrain

TINY = {
    "data": {"max_cells": 150},
    "model": {"d_model": 32, "d_hid": 32, "nlayers": 1, "nhead": 2},
    "tokens": {"max_seq_len": 201},
    "train": {"epochs": 1, "batch_size": 32, "quiet": True},
}
TINY_FLAGS = [
    "--batch-size", "32", "--max-seq-len", "201", "--quiet",
    "--set", "data.max_cells=150", "--set", "model.d_model=32", "--set", "model.d_hid=32",
    "--set", "model.nlayers=1", "--set", "model.nhead=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def mesc_path(kang_stim_path: Path) -> Path:
    return kang_stim_path.parent / "scmerge_mesc_2batches_200cells.h5ad"


@pytest.fixture(scope="module")
def run_dir(
    kang_stim_path: Path, kang_donors_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One epoch of pretraining on two files (what the other tests continue from)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    res = pretrain([kang_stim_path, kang_donors_path], TINY, out)
    assert len(res.history) == 1 and res.n_cells == 300
    return out


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from celltune.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(args)
    captured = capsys.readouterr()
    return int(done.value.code or 0), captured.out, captured.err


# ----------------------------------------------------------------------------- bad input
def test_vocab_of_the_wrong_naming_says_how_many_match_and_why(
    kang_stim_path: Path, mesc_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vocab_path = tmp_path / "vocab.json"
    GeneVocab.from_genes(read_h5ad(kang_stim_path).var_names).to_file(vocab_path)
    args = ["pretrain", str(mesc_path), "--vocab", str(vocab_path), "--out", str(tmp_path / "o")]
    code, _, err = _cli(args, capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line
    assert "matches 0 of the 1,047 genes of scmerge_mesc_2batches_200cells.h5ad" in line
    assert "names look like Ensembl IDs (e.g. ENSMUSG" in line
    assert "the vocabulary's like gene symbols" in line
    assert not (tmp_path / "o" / "checkpoint.pt").exists()  # refused before training


def test_files_with_disjoint_genes_name_the_union_and_overlap(
    kang_stim_path: Path, mesc_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError) as err:
        pretrain([kang_stim_path, mesc_path], TINY, tmp_path / "o")
    msg = str(err.value)
    assert "shares 0 of its" in msg and "union 2,314 genes, in every file 0" in msg
    assert "Ensembl IDs" in msg and "gene symbols" in msg


def test_missing_files_and_label_terms_are_refused(kang_stim_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not found: .*nope\.h5ad"):
        pretrain([kang_stim_path, tmp_path / "nope.h5ad"], TINY, tmp_path / "o")
    with pytest.raises(InputError, match="label-free"):
        pretrain([kang_stim_path], {**TINY, "model": {"dab": True}}, tmp_path / "o")
    assert name_kind(["ENSG00000141510", "ENSG00000012048"]) == "Ensembl IDs"
    assert name_kind(["TP53", "BRCA1"]) == "gene symbols"


def test_keep_vocab_restricts_to_the_init_genes_and_case_is_hinted(
    run_dir: Path, kang_harmony_path: Path, mesc_path: Path
) -> None:
    from celltune.model.checkpoint import load_model
    from celltune.tasks.pretrain import PretrainSection, build_vocab
    from celltune.tasks.pretrain.genes import check_match

    init_vocab = load_model(run_dir / MODEL_DIR).vocab
    genes = list(read_h5ad(kang_harmony_path).var_names)
    keep = PretrainSection(extend_vocab=False)
    with pytest.raises(InputError, match=r"matches 1,533 of the 9,015 .*both look like gene sym"):
        build_vocab({"harmony": genes}, keep, init_vocab, "run/model")  # 17% < 50%
    keep.min_vocab_match = 0.1
    vocab, (fg,) = build_vocab({"harmony": genes}, keep, init_vocab, "run/model")
    assert vocab is init_vocab
    known = init_vocab.token_to_id
    assert fg.n_used == sum(g in known for g in genes) < len(genes)
    assert all((i >= 0) == (g in known) for g, i in zip(genes, fg.gene_ids, strict=True))
    mesc = list(read_h5ad(mesc_path).var_names)
    with pytest.raises(InputError, match=r"--keep-vocab\) matches 0 of the 1,047 genes"):
        build_vocab({"mesc": mesc}, keep, init_vocab, "run/model")
    mouse_case = [g.capitalize() for g in list(known)[:200] if not g.startswith("<")]
    with pytest.raises(InputError, match="match when letter case is ignored"):
        check_match("mouse", mouse_case, init_vocab, "the vocabulary", 0.5)


# ----------------------------------------------------------------------------- resume
def test_resume_continues_the_run_and_refuses_other_files(
    run_dir: Path,
    kang_stim_path: Path,
    kang_donors_path: Path,
    kang_harmony_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    h1 = pd.read_csv(out / "history.csv")
    files = [str(kang_stim_path), str(kang_donors_path)]
    base = ["pretrain", *files, "--out", str(out), *TINY_FLAGS]
    code, stdout, _ = _cli([*base, "--epochs", "2", "--resume"], capsys)
    assert code == 0 and "pretrained on 300 cells of 2 file(s)" in stdout
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [1, 2]
    pd.testing.assert_series_equal(hist.loc[0, h1.columns], h1.loc[0], check_names=False)
    for term in ("mse", "zero_log_prob", "gepc", "gepc_zero_log_prob"):
        assert np.isfinite(hist[f"val/{term}"]).all(), term
    assert not any(c.endswith(("dab", "cls", "ecs")) for c in hist.columns)
    # another file set: refused; a fresh run on a run directory: refused
    other = ["pretrain", files[0], str(kang_harmony_path), "--out", str(out), *TINY_FLAGS]
    code, _, err = _cli([*other, "--epochs", "3", "--resume"], capsys)
    assert code == 2 and "differ" in err
    code, _, err = _cli([*base, "--epochs", "3"], capsys)
    assert code == 2 and "--resume" in err


# ----------------------------------------------------------------------------- e2e
@pytest.mark.e2e
def test_pretrain_then_init_then_integrate_pretrained(
    run_dir: Path,
    kang_stim_path: Path,
    kang_donors_path: Path,
    kang_harmony_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    from celltune.model.checkpoint import load_model

    # the model directory: scGPT files, the union vocabulary, loadable by celltune
    model_dir = run_dir / MODEL_DIR
    for name in ("args.json", "vocab.json", "best_model.pt", "celltune_task.json"):
        assert (model_dir / name).is_file(), name
    model = load_model(model_dir)
    union = set(read_h5ad(kang_stim_path).var_names) | set(read_h5ad(kang_donors_path).var_names)
    assert union <= set(model.vocab.token_to_id) and model.config.d_model == 32
    assert not model.config.do_dab and model.config.num_batch_labels in (0, None)

    # --init on a third file: its new genes are appended, every old id keeps its row
    cont = tmp_path / "cont"
    args = ["pretrain", str(kang_harmony_path), "--init", str(model_dir), "--out", str(cont)]
    code, _, _ = _cli([*args, *TINY_FLAGS, "--epochs", "1", "--lr", "1e-9", "--ecs"], capsys)
    assert code == 0
    assert np.isfinite(pd.read_csv(cont / "history.csv")["val/ecs"]).all()  # --ecs
    wide = load_model(cont / MODEL_DIR)
    old_vocab = model.vocab.token_to_id
    assert all(wide.vocab.token_to_id[g] == i for g, i in old_vocab.items())
    assert wide.config.ntoken > model.config.ntoken  # the harmony file has 9,015 genes
    n_old = model.config.ntoken
    torch.testing.assert_close(  # lr ~0: the pretrained rows are carried over
        wide.encoder.embedding.weight[:n_old], model.encoder.embedding.weight
    )

    # fine-tuning the pretrained model for integration on the third file
    ft = tmp_path / "ft"
    args = [
        "integrate", str(kang_harmony_path), "--batch-key", "batch", "--out", str(ft),
        "--pretrained", str(model_dir), "--epochs", "1", "--batch-size", "32",
        "--n-hvg", "100", "--baselines", "none", "--quiet", "--set", "data.max_cells=150",
        "--set", "eval.umap=false",
    ]  # fmt: skip
    code, _, err = _cli(args, capsys)
    assert code == 0, err
    tuned = load_model(ft / "model")
    assert tuned.config.d_model == 32 and tuned.config.ntoken == model.config.ntoken
    assert np.isfinite(pd.read_csv(ft / "history.csv")["val/mse"]).all()


@pytest.mark.e2e
def test_two_cpu_processes_under_torchrun(
    kang_stim_path: Path, kang_donors_path: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from celltune.model.checkpoint import load_model

    out = tmp_path / "ddp"
    files = [str(kang_stim_path), str(kang_donors_path)]
    cmd = [sys.executable, "-m", "celltune", "pretrain", *files, "--out", str(out)]
    cmd += [*TINY_FLAGS, "--epochs", "1", "--devices", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrained on 300 cells of 2 file(s)" in done.stdout
    assert "world size 2" in done.stderr
    assert load_model(out / MODEL_DIR).config.d_model == 32
