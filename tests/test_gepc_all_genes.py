"""GEPC over every gene (``objective.gepc_genes=all``) on real Kang cells.

With ``include_zero_gene=False`` the tokens hold only expressed genes; the all-genes GEPC
head must still be asked about every HVG, zeros included, so the cell embedding has to
encode which genes are off (issue 16: scGPT's GEPC alone left cell types unresolved).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from celltune.data.binning import bin_matrix, cell_keys
from celltune.data.dataset import CellDataset
from celltune.data.vocab import GeneVocab
from celltune.losses.objective import IntegrationObjective, ObjectiveWeights
from celltune.model.config import ModelConfig
from celltune.model.model import CellTransformer

N_GENES = 200


@pytest.fixture(scope="module")
def cells(kang_stim_path):
    a = ad.read_h5ad(kang_stim_path)[::20, :N_GENES].copy()
    a.layers["X_binned"] = bin_matrix(a.X, 51, seed=0, keys=cell_keys(a.obs_names))
    vocab = GeneVocab.from_genes([g for i, g in enumerate(a.var_names) if i % 7 != 0])
    ids = vocab.match_genes(a.var_names).ids
    return a, vocab, CellDataset(a, ids, batch_key="batch")


def _batch(cells, dense: bool, n: int = 8) -> dict[str, torch.Tensor]:
    _, vocab, ds = cells
    coll = ds.collator(
        cls_id=vocab.cls_id,
        pad_id=vocab.pad_id,
        include_zero_gene=False,
        max_seq_len=N_GENES + 1,
        dense_targets=dense,
    )
    return coll([ds[i] for i in range(n)])


def _tiny_model(vocab) -> CellTransformer:
    """A seeded one-layer model with the GEPC (MVC) head."""
    torch.manual_seed(0)
    config = ModelConfig(
        ntoken=len(vocab), pad_id=vocab.pad_id, d_model=16, nhead=2, d_hid=16, nlayers=1,
        do_mvc=True, explicit_zero_prob=True,
    )  # fmt: skip
    return CellTransformer(config, vocab=vocab)


def test_dense_targets_are_the_binned_rows_of_kept_genes(cells):
    a, _, ds = cells
    b = _batch(cells, dense=True)
    kept = np.flatnonzero(ds.gene_ids >= 0)
    want = a.layers["X_binned"][:8].toarray()[:, kept]
    np.testing.assert_array_equal(b["all_values"].numpy(), want)
    np.testing.assert_array_equal(b["all_gene_ids"].numpy(), ds.gene_ids[kept])
    assert (want == 0).any(), "real cells have zeros among the genes"
    # the tokens themselves are unchanged by the option
    plain = _batch(cells, dense=False)
    assert "all_values" not in plain
    for key in ("gene_ids", "values", "target_values", "padding_mask"):
        assert torch.equal(plain[key], b[key])


def test_gepc_scores_every_gene_when_asked(cells):
    _, vocab, _ = cells
    b = _batch(cells, dense=True)
    model = _tiny_model(vocab)
    out = model(
        b["gene_ids"],
        b["values"],
        padding_mask=b["padding_mask"],
        MVC=True,
        mvc_gene_ids=b["all_gene_ids"],
    )
    G = b["all_values"].shape[1]
    assert out["mvc_output"].shape == (8, G) and out["mvc_zero_probs"].shape == (8, G)
    mask = torch.zeros_like(b["target_values"], dtype=torch.bool)
    mask[:, 1:3] = True
    w = ObjectiveWeights(mlm=0, zero_prob=0, gepc=1, gepc_zero_prob=0, ecs_weight=0, dab_weight=0)
    _, terms = IntegrationObjective(w)(out, b, mask)
    want = torch.mean((out["mvc_output"] - b["all_values"]) ** 2)
    torch.testing.assert_close(terms["loss_gepc"], want)
    # scGPT's GEPC (input tokens, masked positions) is what runs without the dense targets
    out_in = model(b["gene_ids"], b["values"], padding_mask=b["padding_mask"], MVC=True)
    assert out_in["mvc_output"].shape == b["gene_ids"].shape


def test_pca_gene_init_sets_each_gene_to_its_principal_axes(cells):
    """model.gene_init=pca: the HVGs' embedding rows are their PCA loadings (issue 16)."""
    from celltune.errors import InputError
    from celltune.tasks.integration.gene_init import pca_gene_init

    vocab = cells[1]
    batches = [_batch(cells, dense=True, n=40)]
    model = _tiny_model(vocab)
    before = model.encoder.embedding.weight.detach().clone()
    assert pca_gene_init(model, batches) == 40
    ids = batches[0]["all_gene_ids"]
    X = batches[0]["all_values"].double().numpy()
    _, s, vt = np.linalg.svd(X - X.mean(0), full_matrices=False)
    got = model.encoder.embedding.weight.detach()[ids].double().numpy()
    for k in range(3):  # each of the top axes, up to its sign (and a common scale)
        want = vt[k] * s[k]
        cos = got[:, k] @ want / (np.linalg.norm(got[:, k]) * np.linalg.norm(want))
        assert abs(cos) > 0.999, (k, cos)
    others = torch.ones(len(vocab), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(model.encoder.embedding.weight.detach()[others], before[others])
    with pytest.raises(InputError, match="gepc_genes=all"):  # no dense values to read
        pca_gene_init(model, [_batch(cells, dense=False)])
