"""Bradley–Terry loss and pair metrics against hand-derived numbers, autograd and choix."""

from __future__ import annotations

import math

import choix
import numpy as np
import pytest
import torch

from actors.core.bradley_terry import (
    PairMetrics,
    bradley_terry_loss,
    calibration_error,
    pair_metrics,
)

LOG2 = math.log(2.0)
SOFTPLUS_M2 = math.log1p(math.exp(-2.0))  # −log σ(2) = 0.12692801104297263


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_loss_hand_numbers():
    # −log σ(2) and −log σ(0) = log 2, averaged.
    loss = bradley_terry_loss(t64(2.0, 0.0), t64(0.0, 0.0))
    assert loss.item() == pytest.approx((SOFTPLUS_M2 + LOG2) / 2, rel=1e-12)
    # Wrong order costs −log σ(−2) = 2 + log(1 + e^−2).
    assert bradley_terry_loss(t64(0.0), t64(2.0)).item() == pytest.approx(2 + SOFTPLUS_M2,
                                                                          rel=1e-12)


def test_margin_shifts_the_gap():
    # r_w − r_l = 1 with margin 1 is a coin flip; a per-pair margin tensor works the same.
    assert bradley_terry_loss(t64(1.0), t64(0.0), margin=1.0).item() == pytest.approx(LOG2)
    per_pair = bradley_terry_loss(t64(3.0, 1.0), t64(0.0, 0.0), margin=t64(1.0, 1.0))
    assert per_pair.item() == pytest.approx((SOFTPLUS_M2 + LOG2) / 2, rel=1e-12)


def test_label_smoothing_hand_numbers():
    # (1−ε)·softplus(−d) + ε·softplus(d) = softplus(−d) + ε·d, since softplus(d) = d + softplus(−d).
    d, eps = 2.0, 0.1
    loss = bradley_terry_loss(t64(d), t64(0.0), label_smoothing=eps)
    assert loss.item() == pytest.approx(SOFTPLUS_M2 + eps * d, rel=1e-12)
    # At d = 0 smoothing changes nothing.
    assert bradley_terry_loss(t64(0.5), t64(0.5), label_smoothing=0.3).item() == pytest.approx(
        LOG2, rel=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        bradley_terry_loss(t64(0.0), t64(0.0), label_smoothing=0.5)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradient_matches_analytic_and_finite_differences(eps):
    gen = torch.Generator().manual_seed(0)
    r_w = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    r_l = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    margin = torch.rand(7, dtype=torch.float64, generator=gen)
    loss = bradley_terry_loss(r_w, r_l, margin, label_smoothing=eps)
    loss.backward()
    d = (r_w - r_l - margin).detach()
    analytic = (torch.sigmoid(d) - (1.0 - eps)) / 7  # ∂loss/∂r_w
    torch.testing.assert_close(r_w.grad, analytic, rtol=1e-12, atol=0)
    torch.testing.assert_close(r_l.grad, -analytic, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(
        lambda a, b: bradley_terry_loss(a, b, margin, label_smoothing=eps),
        (r_w.detach().requires_grad_(), r_l.detach().requires_grad_()))


CHOIX_DATA = [(0, 1), (0, 2), (1, 2), (2, 3), (1, 4), (0, 3), (3, 4), (2, 4), (0, 4), (1, 3)]
CHOIX_ALPHA = 0.01
# RECIPES.md: choix.opt_pairwise(5, CHOIX_DATA, alpha=0.01) with choix 0.4.1.
CHOIX_REFERENCE = [4.568706689002848, 2.1231243723029136, 2.3e-15, -2.1231243723029163,
                   -4.568706689002847]


def fit_free_scores(data, n_items, alpha):
    """MAP scores θ with our loss: N·BT(θ_w, θ_l) + α·‖θ‖² (choix's penalty is α·Σθ², not α/2)."""
    winners = torch.tensor([w for w, _ in data])
    losers = torch.tensor([v for _, v in data])
    theta = torch.zeros(n_items, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-13,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        objective = (len(data) * bradley_terry_loss(theta[winners], theta[losers])
                     + alpha * theta.pow(2).sum())
        objective.backward()
        return objective

    opt.step(closure)
    return theta.detach()


def test_fitting_free_scores_reproduces_choix():
    theta = fit_free_scores(CHOIX_DATA, 5, CHOIX_ALPHA)
    theta = theta - theta.mean()
    reference = np.asarray(choix.opt_pairwise(5, CHOIX_DATA, alpha=CHOIX_ALPHA))
    np.testing.assert_allclose(reference, CHOIX_REFERENCE, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(theta.numpy(), reference, rtol=1e-5, atol=1e-9)
    # The α/2 penalty the brief suggested would NOT match: the optimum moves by far more.
    wrong = fit_free_scores(CHOIX_DATA, 5, CHOIX_ALPHA / 2)
    assert abs(wrong[0].item() - reference[0]) > 0.1


def test_accuracy_counts_ties_half_and_mean_margin():
    metrics = pair_metrics(t64(1.0, 0.0, 2.0, 0.5), t64(0.0, 0.0, 3.0, 0.5))
    assert metrics.accuracy == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert metrics.mean_margin == pytest.approx((1 + 0 - 1 + 0) / 4)
    assert metrics.n == 4
    assert metrics.as_metrics() == {"rm/accuracy": 0.5, "rm/mean_margin": 0.0,
                                    "rm/ece": metrics.ece}
    assert pair_metrics(t64(), t64()) == PairMetrics(0.0, 0.0, 0.0, 0)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize(("gaps", "expected"), [
    # Confident 0.75 and right 3 times out of 4: perfectly calibrated.
    ([logit(0.75)] * 3 + [-logit(0.75)], 0.0),
    # Always 0.75 and always right: under-confident by 0.25.
    ([logit(0.75)] * 4, 0.25),
    # Two right at 0.9 (gap 0.1), two wrong at 0.65 (gap 0.65): (0.1 + 0.65) / 2.
    ([logit(0.9)] * 2 + [-logit(0.65)] * 2, 0.375),
    # One bin, confidences 0.72, 0.78 (right), 0.74 (wrong): |0.74667 − 2/3| = 0.08.
    ([logit(0.72), logit(0.78), -logit(0.74)], 0.08),
    # A tie predicts 0.5 and is half right: no calibration error.
    ([0.0], 0.0),
])
def test_ece_hand_built(gaps, expected):
    metrics = pair_metrics(t64(*gaps), torch.zeros(len(gaps), dtype=torch.float64))
    assert metrics.ece == pytest.approx(expected, abs=1e-12)


def naive_top_label_ece(gaps: list[float], n_bins: int) -> float:
    """Textbook ECE: confidence max(p, 1−p) in equal-width bins vs 'favoured reply was chosen'."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for gap in gaps:
        p = 1 / (1 + math.exp(-gap))
        conf, right = (p, 1.0) if p > 0.5 else (1 - p, 0.0) if p < 0.5 else (0.5, 0.5)
        bins.setdefault(min(int(conf * n_bins), n_bins - 1), []).append((conf, right))
    total = 0.0
    for members in bins.values():
        mean_conf = sum(c for c, _ in members) / len(members)
        mean_right = sum(r for _, r in members) / len(members)
        total += len(members) / len(gaps) * abs(mean_conf - mean_right)
    return total


@pytest.mark.parametrize("n_bins", [4, 10, 20])  # even: bin edges symmetric about 0.5
def test_ece_equals_naive_top_label_reference(n_bins):
    gaps = (torch.randn(500, generator=torch.Generator().manual_seed(n_bins),
                        dtype=torch.float64) * 2 + 0.7)
    ece = calibration_error(torch.sigmoid(gaps), n_bins)
    assert ece == pytest.approx(naive_top_label_ece(gaps.tolist(), n_bins), rel=1e-10)
    assert 0.0 < ece < 1.0
