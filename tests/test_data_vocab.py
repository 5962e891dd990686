"""Gene vocabulary: scGPT vocab.json round trip, special tokens, gene matching."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pytest

from celltune.data.vocab import GeneVocab
from celltune.errors import InputError


@pytest.fixture(scope="module")
def ref_vocab_path(fixtures_dir):
    return fixtures_dir / "fixture_integration" / "vocab.json"


@pytest.fixture(scope="module")
def ref(ref_vocab_path):
    return GeneVocab.from_file(ref_vocab_path)


def test_reads_scgpt_vocab_with_its_ids(ref, ref_vocab_path):
    raw = json.loads(ref_vocab_path.read_text())
    assert len(ref) == len(raw) == 203
    assert ref.token_to_id == raw  # ids exactly as stored, nothing re-numbered or added
    assert (ref.pad_id, ref.cls_id, ref.eoc_id) == (200, 201, 202)
    assert ref.pad_token == "<pad>"
    assert ref["CD3D"] == 0 and ref.id_to_token(0) == "CD3D"
    assert "CD3D" in ref and "NOT_A_GENE" not in ref
    assert ref.ntoken == 203
    with pytest.raises(KeyError):
        ref["NOT_A_GENE"]
    with pytest.raises(KeyError):
        ref.id_to_token(999)


def test_model_dir_accepted(ref, ref_vocab_path):
    assert GeneVocab.from_file(ref_vocab_path.parent).token_to_id == ref.token_to_id


def test_round_trip_is_identical(ref, ref_vocab_path, tmp_path):
    out = tmp_path / "vocab.json"
    ref.to_file(out)
    assert json.loads(out.read_text()) == json.loads(ref_vocab_path.read_text())
    assert GeneVocab.from_file(out).token_to_id == ref.token_to_id
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # atomic: no temp left


def test_specials_appended_when_missing(tmp_path):
    p = tmp_path / "v.json"
    p.write_text(json.dumps({"CD3D": 0, "CD4": 5, "<cls>": 2}))
    v = GeneVocab.from_file(p)
    assert v["<cls>"] == 2  # an existing special keeps its id
    assert (v.pad_id, v.eoc_id) == (6, 7)  # missing ones go after the largest id
    assert v.ntoken == 8


def test_from_genes_real_dataset(kang_stim_path, tmp_path):
    genes = list(ad.read_h5ad(kang_stim_path).var_names)
    v = GeneVocab.from_genes(genes + genes[:3])  # duplicates kept once
    assert len(v) == len(genes) + 3
    assert [v[g] for g in genes] == list(range(len(genes)))
    assert (v.pad_id, v.cls_id, v.eoc_id) == (len(genes), len(genes) + 1, len(genes) + 2)
    v.to_file(tmp_path / "vocab.json")
    assert GeneVocab.from_file(tmp_path / "vocab.json").token_to_id == v.token_to_id


def test_match_genes_real_data(ref, kang_harmony_path, caplog):
    genes = list(ad.read_h5ad(kang_harmony_path).var_names)
    in_vocab = {t for t in ref.token_to_id if not t.startswith("<")}
    expected = sum(g in in_vocab for g in genes)
    assert 0 < expected < len(genes)
    with caplog.at_level(logging.INFO, logger="celltune.data.vocab"):
        m = ref.match_genes(genes)
    assert m.n_total == len(genes) == 9015
    assert m.n_matched == expected == int(m.matched.sum())
    assert m.ids.dtype == np.int64
    assert (m.ids[~m.matched] == -1).all()
    pairs = zip(np.array(genes)[m.matched], m.ids[m.matched], strict=True)
    assert all(ref[g] == i for g, i in pairs)
    assert f"matched {expected:,}/9,015 genes" in caplog.text


def test_special_tokens_never_match_genes(ref):
    m = ref.match_genes(["CD3D", "<pad>", "<cls>"])
    assert list(m.ids) == [0, -1, -1]


def test_no_gene_matches_is_an_error(ref, adamson_mini_path):
    ensembl = list(ad.read_h5ad(adamson_mini_path).var_names)  # GEARS: Ensembl ids
    with pytest.raises(InputError, match=r"none of the 160 genes matched.*gene_name"):
        ref.match_genes(ensembl)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json", "not valid JSON"),
        ('["CD3D", "CD4"]', "expected an object"),
        ('{"CD3D": 0, "CD4": 0}', "unique"),
        ('{"CD3D": "zero"}', "integer"),
        ('{"CD3D": -1}', "negative"),
    ],
)
def test_bad_vocab_files(tmp_path, content, match):
    p = tmp_path / "vocab.json"
    p.write_text(content)
    with pytest.raises(InputError, match=match):
        GeneVocab.from_file(p)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        GeneVocab.from_file(tmp_path / "vocab.json")
