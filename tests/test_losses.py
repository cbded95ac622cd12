"""The loss functions of rlhf_workflow.train.losses, by hand: Bradley–Terry, label-token, and the DPO
family (sigmoid / cDPO, robust, IPO, hinge, RPO), with the closed-form gradient of the sigmoid loss."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_workflow.train.losses import PREFERENCE_LOSSES, bradley_terry_loss, dpo_loss, label_token_loss, sigmoid_loss

# ------------------------------------------------------------------------------------------- reward models


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = -math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(expected, abs=1e-6)
    # a margin of 1 moves both differences down by 1: -log σ(0) - log σ(-2)
    with_margin = -math.log(0.5) - math.log(1 / (1 + math.exp(2.0)))
    assert bradley_terry_loss(rc, rr, margin=1.0).item() == pytest.approx(with_margin, abs=1e-6)
    # centering adds η Σ (r_c + r_r)² = 0.1 · (9 + 1)
    assert bradley_terry_loss(rc, rr, center_coef=0.1).item() == pytest.approx(expected + 1.0, abs=1e-6)


def test_label_token_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    lse0 = math.log(math.exp(2) + 1 + math.exp(1))
    expected = (lse0 - 2.0) + math.log(3)
    assert label_token_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------- DPO

# policy chosen/rejected, reference chosen/rejected: h = (−1 − −2) − (−3 − −2) = 2
LOGPS = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]
LOG_SIG_1, LOG_SIG_M1 = math.log(1 / (1 + math.exp(-1))), math.log(1 / (1 + math.exp(1)))


@pytest.mark.parametrize("loss_type, beta, eps, expected", [
    ("sigmoid", 0.5, 0.0, -LOG_SIG_1),                                   # −log σ(βh), βh = 1
    ("sigmoid", 0.5, 0.1, -0.9 * LOG_SIG_1 - 0.1 * LOG_SIG_M1),          # cDPO
    ("robust", 0.5, 0.1, (-0.9 * LOG_SIG_1 + 0.1 * LOG_SIG_M1) / 0.8),   # rDPO
    ("ipo", 0.5, 0.0, (2 - 1 / (2 * 0.5)) ** 2),                         # (h − 1/2β)²
    ("ipo", 0.25, 0.0, (2 - 2) ** 2),
    ("hinge", 0.25, 0.0, 1 - 0.25 * 2),                                  # max(0, 1 − βh)
    ("hinge", 0.5, 0.0, 0.0),
])
def test_loss_values_by_hand(loss_type, beta, eps, expected):
    got = dpo_loss(*LOGPS, loss_type=loss_type, beta=beta, label_smoothing=eps)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_rpo_adds_alpha_times_the_chosen_nll_and_losses_sum_over_pairs():
    base = dpo_loss(*LOGPS, beta=0.5)
    nll = torch.tensor([0.7])
    assert dpo_loss(*LOGPS, beta=0.5, nll=nll, rpo_alpha=2.0).item() == pytest.approx(base.item() + 1.4, abs=1e-6)
    two = [torch.cat([t, t]) for t in LOGPS]
    assert dpo_loss(*two, beta=0.5).item() == pytest.approx(2 * base.item(), abs=1e-6)
    with pytest.raises(ValueError, match="nll"):
        dpo_loss(*LOGPS, rpo_alpha=1.0)


def test_sigmoid_gradient_wrt_the_log_ratio_margin():
    """d/dh [−log σ(βh)] = −β σ(−βh): the update weighs each pair by how wrong the implicit reward is."""
    h = torch.tensor([-1.5, 0.0, 0.7, 4.0], requires_grad=True)
    beta = 0.3
    sigmoid_loss(h, beta).sum().backward()
    torch.testing.assert_close(h.grad, -beta * torch.sigmoid(-beta * h.detach()))


def test_every_loss_falls_as_the_chosen_response_gains_and_ipo_stops_at_its_target():
    h = torch.linspace(-3, 3, 13)
    for name in ("sigmoid", "robust", "hinge"):
        values = PREFERENCE_LOSSES[name](h, 0.5, 0.1 if name != "hinge" else 0.0)
        assert (values[1:] <= values[:-1] + 1e-7).all() and values[0] > values[-1], name
    ipo = PREFERENCE_LOSSES["ipo"](h, 0.5)
    assert ipo.argmin().item() == 8 and ipo.min().item() == 0.0  # h = 1 = 1/(2β)
