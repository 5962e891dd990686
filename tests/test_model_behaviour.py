"""CellTransformer behaviour on hand-made inputs with known answers, and on real cells."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from celltune.errors import InputError
from celltune.model import CellTransformer, ModelConfig, load_model
from celltune.model.encoders import DomainSpecificBatchNorm1d


def tiny(**kw) -> CellTransformer:
    base = dict(ntoken=40, d_model=16, nhead=2, d_hid=24, nlayers=2, pad_id=37, dropout=0.0)
    base.update(kw)
    torch.manual_seed(0)
    return CellTransformer(ModelConfig(**base))


def tokens(B: int = 4, L: int = 12, n_pad: tuple[int, ...] = (0, 3, 5, 0), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 36, (B, L), generator=g)
    ids[:, 0] = 38  # <cls>
    values = torch.randint(0, 10, (B, L), generator=g).float()
    pad = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(n_pad[:B]):
        if n:
            pad[i, L - n :] = True
    ids[pad] = 37
    values[pad] = -2
    return ids, values, pad


# --------------------------------------------------------------------------- attention
@pytest.mark.parametrize("pre_norm", [False, True])
def test_layer_matches_torch_transformer_layer_with_padding(pre_norm: bool) -> None:
    model = tiny(pre_norm=pre_norm, nlayers=1)
    ours = model.transformer_encoder
    ref = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True, norm_first=pre_norm)
    ref.load_state_dict(ours.layers[0].state_dict())
    x = torch.randn(3, 9, 16, requires_grad=True)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    ours.train()
    ref.train()
    a = ours(x, pad)
    b = ref(x, src_key_padding_mask=pad)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    ga = torch.autograd.grad(a[~pad].sum(), x)[0]
    gb = torch.autograd.grad(b[~pad].sum(), x)[0]
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


def test_attention_dropout_only_in_training() -> None:
    model = tiny(attn_dropout=0.5)
    ids, values, pad = tokens()
    model.eval()
    e1 = model(ids, values, padding_mask=pad)["cell_emb"]
    e2 = model(ids, values, padding_mask=pad)["cell_emb"]
    torch.testing.assert_close(e1, e2)
    model.train()
    t1 = model(ids, values, padding_mask=pad)["cell_emb"]
    assert not torch.allclose(t1, e1)


def test_grad_checkpoint_gives_identical_gradients() -> None:
    ids, values, pad = tokens()
    grads = []
    for ckpt in (False, True):
        model = tiny(grad_checkpoint=ckpt, dropout=0.3)
        model.train()
        torch.manual_seed(5)
        model(ids, values, padding_mask=pad)["mlm_output"].sum().backward()
        grads.append(model.transformer_encoder.layers[0].linear1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# --------------------------------------------------------------------------- interface
def test_only_requested_heads_are_computed() -> None:
    model = tiny(do_dab=True, use_batch_labels=True, num_batch_labels=2).eval()
    ids, values, pad = tokens()
    labels = torch.tensor([0, 1, 1, 0])
    out = model(ids, values, padding_mask=pad, batch_labels=labels)
    assert set(out) == {"mlm_output", "mlm_zero_probs", "cell_emb", "dab_output"}
    out = model(
        ids, values, padding_mask=pad, batch_labels=labels, CLS=True, MVC=True, ECS=True, CCE=True
    )
    assert {"cls_output", "mvc_output", "mvc_zero_probs", "loss_ecs", "loss_cce"} <= set(out)
    assert out["mvc_output"].shape == (4, 12) and out["dab_output"].shape == (4, 2)


def test_scgpt_keyword_and_positional_calls_agree() -> None:
    model = tiny(use_batch_labels=True, num_batch_labels=2).eval()
    ids, values, pad = tokens()
    labels = torch.tensor([0, 1, 1, 0])
    a = model(ids, values, padding_mask=pad, batch_labels=labels)["mlm_output"]
    b = model(src=ids, values=values, src_key_padding_mask=pad, batch_labels=labels)["mlm_output"]
    c = model(ids, values, pad, labels)["mlm_output"]  # TransformerModel.forward order
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_bad_inputs_raise_input_error() -> None:
    model = tiny().eval()
    ids, values, pad = tokens()
    with pytest.raises(InputError, match="2-D"):
        model(ids[0], values[0])
    with pytest.raises(InputError, match="values shape"):
        model(ids, values[:, :5])
    with pytest.raises(InputError, match="padding mask shape"):
        model(ids, values, padding_mask=pad[:, :3])
    bad = ids.clone()
    bad[0, 1] = 40
    with pytest.raises(InputError, match="vocab"):
        model(bad, values)
    with pytest.raises(InputError, match="pert_flags"):
        model(ids, values, torch.zeros_like(ids))


def test_batch_label_errors_in_training() -> None:
    model = tiny(use_batch_labels=True, domain_spec_batchnorm=True, num_batch_labels=2).train()
    ids, values, pad = tokens()
    with pytest.raises(InputError, match="batch_labels"):
        model(ids, values, padding_mask=pad)
    with pytest.raises(InputError, match=r"\[2\] >= the 2 batches"):
        model(ids, values, padding_mask=pad, batch_labels=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(InputError, match=">= 0"):
        model(ids, values, padding_mask=pad, batch_labels=torch.tensor([0, -1, 1, 0]))


# --------------------------------------------------------------------------- DSBN
def _train_stats(model: CellTransformer, ids, values, pad, labels) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(ids, values, padding_mask=pad, batch_labels=labels)
    model.eval()


def test_dsbn_per_cell_training_equals_each_batch_alone() -> None:
    ids, values, pad = tokens()
    labels = torch.tensor([0, 1, 1, 0])
    model = tiny(domain_spec_batchnorm=True, num_batch_labels=2, use_batch_labels=True).train()
    mixed = model(ids, values, padding_mask=pad, batch_labels=labels)["cell_emb"]
    for lab in (0, 1):
        rows = labels == lab
        alone = model(ids[rows], values[rows], padding_mask=pad[rows], batch_labels=labels[rows])
        torch.testing.assert_close(mixed[rows], alone["cell_emb"], atol=1e-5, rtol=1e-4)


def test_dsbn_pooled_statistics_formula() -> None:
    dsbn = DomainSpecificBatchNorm1d(3, 2).eval()
    dsbn.bns[0].running_mean.copy_(torch.tensor([0.0, 1.0, 2.0]))
    dsbn.bns[1].running_mean.copy_(torch.tensor([2.0, 1.0, 0.0]))
    dsbn.bns[0].running_var.copy_(torch.tensor([1.0, 2.0, 3.0]))
    dsbn.bns[1].running_var.copy_(torch.tensor([3.0, 2.0, 1.0]))
    for bn in dsbn.bns:
        bn.num_batches_tracked.fill_(1)
    x = torch.randn(2, 5, 3)
    out = dsbn(x, torch.tensor([-1, 1]))
    mean = torch.tensor([1.0, 1.0, 1.0])
    var = torch.tensor([2.0 + 1.0, 2.0 + 0.0, 2.0 + 1.0])  # mean var + var of means
    torch.testing.assert_close(out[0], (x[0] - mean) / torch.sqrt(var + dsbn.eps))
    torch.testing.assert_close(out[1], dsbn.bns[1](x[1:].transpose(1, 2)).transpose(1, 2)[0])


def test_unseen_batch_at_inference_falls_back_with_warning() -> None:
    ids, values, pad = tokens()
    model = tiny(domain_spec_batchnorm=True, use_batch_labels=True, num_batch_labels=2)
    _train_stats(model, ids, values, pad, torch.tensor([0, 1, 1, 0]))
    with pytest.warns(UserWarning, match="not seen in training"):
        a = model(ids, values, padding_mask=pad, batch_labels=torch.tensor([0, 5, 1, 7]))
    with pytest.warns(UserWarning, match="no batch_labels"):
        b = model(ids, values, padding_mask=pad)
    assert all(torch.isfinite(v).all() for v in a.values())
    # unseen cells get the same (pooled) treatment whatever their unseen label
    torch.testing.assert_close(a["mlm_output"][[1, 3]], b["mlm_output"][[1, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen = model(ids, values, padding_mask=pad, batch_labels=torch.tensor([0, 1, 1, 0]))
    torch.testing.assert_close(a["mlm_output"][[0, 2]], seen["mlm_output"][[0, 2]])
    # the batch-embedding fallback is the mean of the known batch vectors
    enc = model.batch_encoder
    fallback = enc(torch.tensor([3]), torch.tensor([False]))
    torch.testing.assert_close(fallback[0], enc.enc_norm(enc.embedding.weight).mean(0))


def test_embeddings_do_not_depend_on_chunk_size(fixtures_dir: Path) -> None:
    """scGPT issue #281: embedding 6 cells at once equals embedding them one by one."""
    d = fixtures_dir / "fixture_integration"
    model = load_model(d)
    with np.load(d / "golden" / "inputs_mixed.npz") as f:
        ids, values = torch.from_numpy(f["gene_ids"]), torch.from_numpy(f["values"])
        pad, labels = (
            torch.from_numpy(f["src_key_padding_mask"]),
            torch.from_numpy(f["batch_labels"]),
        )
    together = model.embed(ids, values, pad, labels)
    for i in range(6):
        n = int((~pad[i]).sum())  # a chunk of one cell has no padding at all
        alone = model.embed(
            ids[i : i + 1, :n], values[i : i + 1, :n], pad[i : i + 1, :n], labels[i : i + 1]
        )
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-4)
    pairs = torch.cat(
        [
            model.embed(ids[i : i + 2], values[i : i + 2], pad[i : i + 2], labels[i : i + 2])
            for i in range(0, 6, 2)
        ]
    )
    torch.testing.assert_close(together, pairs, atol=1e-5, rtol=1e-4)
    assert model.training is False


# --------------------------------------------------------------------------- styles
@pytest.mark.parametrize("style", ["avg-pool", "w-pool", "cls"])
def test_cell_embedding_ignores_padding(style: str) -> None:
    model = tiny(cell_emb_style=style).eval()
    ids, values, pad = tokens(B=1, n_pad=(0,))
    extra_ids = torch.cat([ids, torch.full((1, 4), 37)], 1)
    extra_vals = torch.cat([values, torch.full((1, 4), -2.0)], 1)
    a = model.embed(ids, values, pad)
    b = model.embed(extra_ids, extra_vals, extra_ids == 37)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if style == "avg-pool":
        h, _ = model._encode(ids, values, None, pad, None, None)
        torch.testing.assert_close(a, h.mean(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("style", ["category", "scaling"])
def test_input_embedding_styles(style: str) -> None:
    model = tiny(input_emb_style=style, n_input_bins=53).eval()
    ids, values, pad = tokens()
    out = model(ids, values, padding_mask=pad)
    assert out["mlm_output"].shape == (4, 12)
    if style == "scaling":
        assert not any(k.startswith("value_encoder.") for k in model.state_dict())
        genes = model.encoder(ids)
        x = genes * values.unsqueeze(2)
        torch.testing.assert_close(
            model.transformer_encoder(x, pad), model._encode(ids, values, None, pad, None, None)[0]
        )
    else:
        assert model.state_dict()["value_encoder.embedding.weight"].shape == (53, 16)


@pytest.mark.parametrize("style", ["concat query", "sum query"])
def test_mvc_query_styles(style: str) -> None:
    model = tiny(mvc_decoder_style=style, explicit_zero_prob=False).eval()
    ids, values, pad = tokens()
    out = model(ids, values, padding_mask=pad, MVC=True)
    assert out["mvc_output"].shape == (4, 12) and "mvc_zero_probs" not in out


def test_mvc_inner_product_formula() -> None:
    model = tiny(use_batch_labels=True, num_batch_labels=2).eval()
    ids, values, pad = tokens()
    labels = torch.tensor([0, 1, 0, 1])
    out = model(ids, values, padding_mask=pad, batch_labels=labels, MVC=True)
    dec = model.mvc_decoder
    q = torch.sigmoid(dec.gene2query(model.encoder(ids)))
    cell = torch.cat([out["cell_emb"], model.batch_encoder(labels)], 1)
    pred = torch.einsum("bld,bd->bl", dec.W(q), cell)
    zero = torch.sigmoid(torch.einsum("bld,bd->bl", dec.W_zero_logit(q), cell))
    torch.testing.assert_close(out["mvc_output"], pred, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["mvc_zero_probs"], zero, atol=1e-6, rtol=1e-4)


def test_do_sample_zeroes_values_by_bernoulli() -> None:
    model = tiny().eval()
    ids, values, pad = tokens()
    with torch.no_grad():
        model.decoder.zero_logit[4].bias.fill_(-50.0)  # P(non-zero) ≈ 0
        out = model(ids, values, padding_mask=pad, do_sample=True)
    assert torch.all(out["mlm_output"] == 0)


def test_cce_views_differ_only_in_training() -> None:
    model = tiny(dropout=0.3)
    ids, values, pad = tokens()
    model.eval()
    ev = model(ids, values, padding_mask=pad, CCE=True)["loss_cce"]
    e = torch.nn.functional.normalize(model.embed(ids, values, pad), dim=1)
    expected = torch.nn.functional.cross_entropy(e @ e.t() / 0.5, torch.arange(4))
    torch.testing.assert_close(ev, expected, atol=1e-5, rtol=1e-4)
    model.train()
    tr = model(ids, values, padding_mask=pad, CCE=True)["loss_cce"]
    assert not torch.isclose(tr, ev)


def test_generator_flags_change_prediction() -> None:
    model = tiny(
        generator=True, decoder="affine", do_mvc=False, explicit_zero_prob=False, pad_value=0
    ).eval()
    ids, values, pad = tokens(n_pad=(0, 0, 0, 0))
    flags = torch.zeros_like(ids)
    a = model(ids, values, flags, pad)["mlm_output"]
    flags[:, 3] = 1
    b = model(ids, values, flags, pad)["mlm_output"]
    assert not torch.allclose(a, b)
    with pytest.raises(InputError, match="pert_flags"):
        model(ids, values)
    assert torch.all(model.pert_encoder.weight[0] == 0)  # pert_pad_id = 0 row


def test_invalid_config_names_the_fix() -> None:
    with pytest.raises(InputError, match="divisible"):
        ModelConfig(ntoken=10, d_model=10, nhead=3, pad_id=0)
    with pytest.raises(InputError, match="num_batch_labels"):
        ModelConfig(ntoken=10, d_model=8, nhead=2, pad_id=0, use_batch_labels=True)
    with pytest.raises(InputError, match="pad_id"):
        ModelConfig(ntoken=10, d_model=8, nhead=2)


# --------------------------------------------------------------------------- real data
@pytest.mark.e2e
def test_tiny_model_learns_on_real_cells(kang_stim_path: Path) -> None:
    """A few Adam steps on 48 real PBMCs lower the integration objective."""
    import anndata as ad

    from celltune.data.binning import bin_matrix
    from celltune.losses import IntegrationObjective

    adata = ad.read_h5ad(kang_stim_path)[:48]
    X = adata.X.toarray()
    genes = np.argsort(-(X > 0).sum(0))[:31]  # 31 most detected genes
    binned = bin_matrix(X[:, genes], n_bins=11, seed=0)
    batch = torch.tensor(adata.obs["batch"].cat.codes.to_numpy(), dtype=torch.long)
    ids = torch.cat([torch.full((48, 1), 32), torch.arange(31).repeat(48, 1)], 1)
    target = torch.cat([torch.zeros(48, 1), torch.from_numpy(np.asarray(binned))], 1).float()
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(48, 32, generator=g) < 0.4
    mask[:, 0] = False
    values = target.masked_fill(mask, -1.0)
    torch.manual_seed(0)
    model = CellTransformer(
        ModelConfig(
            ntoken=34,
            d_model=32,
            nhead=4,
            d_hid=32,
            nlayers=2,
            pad_id=33,
            dropout=0.1,
            do_dab=True,
            use_batch_labels=True,
            num_batch_labels=2,
            domain_spec_batchnorm=True,
        )
    ).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    objective = IntegrationObjective()
    losses = []
    for _ in range(25):
        out = model(ids, values, batch_labels=batch, MVC=True, ECS=True)
        total, terms = objective(out, {"target_values": target, "batch_labels": batch}, mask)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(terms["loss_mse"].item())
    assert set(terms) == {
        "loss_mse",
        "loss_zero_log_prob",
        "loss_gepc",
        "loss_gepc_zero_log_prob",
        "loss_ecs",
        "loss_dab",
    }
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
