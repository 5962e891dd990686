"""SPEC §4 loss formulas against direct computations on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from celltune.errors import InputError
from celltune.losses import (
    IntegrationObjective,
    ObjectiveWeights,
    PerturbationObjective,
    bernoulli_nll,
    cce_loss,
    cross_entropy,
    ecs_loss,
    masked_mse,
    masked_relative_error,
    spread_loss,
)
from celltune.model.heads import AdversarialDiscriminator, grad_reverse

PRED = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
TARGET = torch.tensor([[1.5, 0.0, 1.0], [0.0, 2.0, 4.0]])


def test_masked_mse_one_position_and_all_positions() -> None:
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 1] = True
    assert masked_mse(PRED, TARGET, one).item() == pytest.approx((-1.0 - 2.0) ** 2)
    every = torch.ones(2, 3, dtype=torch.bool)
    direct = sum(
        (p - t) ** 2
        for p, t in zip(PRED.flatten().tolist(), TARGET.flatten().tolist(), strict=True)
    )
    assert masked_mse(PRED, TARGET, every).item() == pytest.approx(direct / 6)


def test_masked_mse_ignores_unmasked_values_and_checks_shapes() -> None:
    mask = torch.tensor([[True, False, False], [False, False, True]])
    noisy = PRED.clone()
    noisy[~mask] = 1e6
    assert masked_mse(noisy, TARGET, mask).item() == pytest.approx(((1 - 1.5) ** 2 + 0) / 2)
    with pytest.raises(InputError, match="same shape"):
        masked_mse(PRED, TARGET[:, :2], mask)


def test_bernoulli_nll_matches_distribution() -> None:
    prob = torch.tensor([[0.9, 0.2, 0.6], [0.3, 0.7, 0.999]])
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[0, 1] = True  # target 0 → log(1 - 0.2)
    assert bernoulli_nll(prob, TARGET, one).item() == pytest.approx(-math.log(0.8), rel=1e-6)
    every = torch.ones(2, 3, dtype=torch.bool)
    ref = -torch.distributions.Bernoulli(probs=prob).log_prob((TARGET > 0).float()).mean()
    assert bernoulli_nll(prob, TARGET, every).item() == pytest.approx(ref.item(), rel=1e-6)


def test_bernoulli_nll_is_finite_at_probability_0_and_1() -> None:
    prob = torch.tensor([[0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0]])
    value = bernoulli_nll(prob, target, torch.ones(1, 2, dtype=torch.bool))
    assert torch.isfinite(value) and value.item() > 10


def test_ecs_direct_loop() -> None:
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.2]])
    e = [v / v.norm() for v in emb]
    total = 0.0
    for i in range(3):
        for j in range(3):
            s = 0.0 if i == j else max(0.0, float(e[i] @ e[j]))
            total += 1 - (s - 0.8) ** 2
    assert ecs_loss(emb, 0.8).item() == pytest.approx(total / 9, rel=1e-6)


def test_cce_direct() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[0.9, 0.1], [0.2, 1.0], [1.0, 0.8]])
    sim = torch.tensor([[float(F.cosine_similarity(x, y, dim=0)) / 0.5 for y in b] for x in a])
    expected = -torch.log_softmax(sim, 1).diagonal().mean()
    assert cce_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-6)
    assert cce_loss(a, b, gather=True).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cross_entropy_ignores_unknown_labels() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, -5.0]])
    labels = torch.tensor([0, 1, -1])
    expected = F.cross_entropy(logits[:2], labels[:2])
    assert cross_entropy(logits, labels).item() == pytest.approx(expected.item())


def test_masked_relative_error() -> None:
    mask = torch.tensor([[True, False, True], [False, False, True]])
    expected = (abs(1 - 1.5) / 1.5 + abs(3 - 1.0) / 1.0 + 0.0) / 3
    assert masked_relative_error(PRED, TARGET, mask).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(InputError, match="no position"):
        masked_relative_error(PRED, TARGET, torch.zeros(2, 3, dtype=torch.bool))


def _outputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "mlm_output": torch.randn(4, 5, generator=g),
        "mlm_zero_probs": torch.rand(4, 5, generator=g),
        "mvc_output": torch.randn(4, 5, generator=g),
        "mvc_zero_probs": torch.rand(4, 5, generator=g),
        "cell_emb": torch.randn(4, 3, generator=g),
        "dab_output": torch.randn(4, 2, generator=g),
        "cls_output": torch.randn(4, 3, generator=g),
        "loss_cce": torch.tensor(0.7),
    }


def test_integration_objective_weights_and_terms() -> None:
    out = _outputs()
    target = torch.randint(0, 3, (4, 5)).float()
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[0, 0] = True
    batch = {
        "target_values": target,
        "batch_labels": torch.tensor([0, 1, 1, 0]),
        "celltype_labels": torch.tensor([0, 2, -1, 1]),
    }
    w = ObjectiveWeights(cls_weight=0.5, cce_weight=2.0, ecs_weight=10.0, dab_weight=3.0)
    total, terms = IntegrationObjective(w)(out, batch, mask)
    expected_terms = {
        "loss_mse": masked_mse(out["mlm_output"], target, mask),
        "loss_zero_log_prob": bernoulli_nll(out["mlm_zero_probs"], target, mask),
        "loss_gepc": masked_mse(out["mvc_output"], target, mask),
        "loss_gepc_zero_log_prob": bernoulli_nll(out["mvc_zero_probs"], target, mask),
        "loss_ecs": ecs_loss(out["cell_emb"], 0.8),
        "loss_dab": F.cross_entropy(out["dab_output"], batch["batch_labels"]),
        "loss_cls": F.cross_entropy(out["cls_output"][[0, 1, 3]], torch.tensor([0, 2, 1])),
        "loss_cce": torch.tensor(0.7),
    }
    assert set(terms) == set(expected_terms)
    for k, v in expected_terms.items():
        assert terms[k].item() == pytest.approx(v.item(), rel=1e-6), k
    weights = {"loss_ecs": 10.0, "loss_dab": 3.0, "loss_cls": 0.5, "loss_cce": 2.0}
    expected_total = sum(weights.get(k, 1.0) * v.item() for k, v in expected_terms.items())
    assert total.item() == pytest.approx(expected_total, rel=1e-6)


def test_spread_loss_penalises_a_collapsed_embedding() -> None:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 8, generator=g) * 2.0  # every dim varies, uncorrelated
    axis = torch.randn(256, 1, generator=g) * 2.0
    collapsed = axis @ torch.ones(1, 8) + 0.01 * torch.randn(256, 8, generator=g)  # one axis
    assert spread_loss(spread).item() < 1.0 and spread_loss(collapsed).item() > 10.0
    # direct: hinge on each dim's std + squared off-diagonal covariances / d
    z = collapsed - collapsed.mean(0)
    cov = z.t() @ z / 255
    std = torch.sqrt(torch.diagonal(cov) + 1e-4)
    off = (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / 8
    assert spread_loss(collapsed).item() == pytest.approx((F.relu(1 - std).mean() + off).item())
    assert spread_loss(torch.randn(1, 8)).item() == 0.0  # one cell: no spread to measure
    # off by default; with a weight it is one more term of the total
    out = _outputs()
    target = torch.ones(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    labels = {"target_values": target, "batch_labels": torch.tensor([0, 1, 1, 0])}
    assert "loss_spread" not in IntegrationObjective()(out, labels, mask)[1]
    w = ObjectiveWeights(zero_prob=0, gepc=0, gepc_zero_prob=0, ecs_weight=0, dab_weight=0)
    base, _ = IntegrationObjective(w)(out, {"target_values": target}, mask)
    w.spread_weight = 3.0
    total, terms = IntegrationObjective(w)(out, {"target_values": target}, mask)
    assert set(terms) == {"loss_mse", "loss_spread"}
    expected = base.item() + 3.0 * spread_loss(out["cell_emb"]).item()
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_objective_switches_terms_off() -> None:
    out = _outputs()
    target = torch.ones(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    w = ObjectiveWeights(zero_prob=0, gepc=0, gepc_zero_prob=0, ecs_weight=0, dab_weight=0)
    total, terms = IntegrationObjective(w)(out, {"target_values": target}, mask)
    assert set(terms) == {"loss_mse"}
    assert total.item() == pytest.approx(masked_mse(out["mlm_output"], target, mask).item())
    with pytest.raises(InputError, match="celltype_labels"):
        IntegrationObjective(ObjectiveWeights(cls_weight=1.0))(
            out, {"target_values": target, "batch_labels": torch.zeros(4, dtype=torch.long)}, mask
        )


def test_perturbation_objective_all_positions_except_padding() -> None:
    pred = torch.tensor([[1.0, 2.0, 9.0]])
    target = torch.tensor([[0.0, 2.0, 0.0]])
    loss, terms = PerturbationObjective()(
        {"mlm_output": pred}, {"target_values": target, "padding_mask": torch.tensor([[0, 0, 1]])}
    )
    assert loss.item() == pytest.approx(0.5) and terms["loss_mse"] is loss
    loss_all, _ = PerturbationObjective()({"mlm_output": pred}, {"target_values": target})
    assert loss_all.item() == pytest.approx((1 + 0 + 81) / 3)


def test_gradient_reversal_flips_discriminator_gradient_into_encoder() -> None:
    torch.manual_seed(0)
    disc = AdversarialDiscriminator(4, 3)
    emb = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1, 0])
    F.cross_entropy(disc(emb), labels).backward()
    reversed_grad = emb.grad.clone()
    # the same discriminator without reversal
    emb.grad = None
    disc.reverse_grad = False
    F.cross_entropy(disc(emb), labels).backward()
    torch.testing.assert_close(reversed_grad, -emb.grad)
    assert reversed_grad.abs().sum() > 0
    # the discriminator's own parameters are trained normally (same gradient both ways)
    x = torch.randn(3, 2, requires_grad=True)
    grad_reverse(x, 2.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 2), -2.0))
