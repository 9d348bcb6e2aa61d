"""Sequence losses on small hand-computed cases (docs/method.md section 2 and the ``c``/``w`` of
section 3). Expected values are literals worked out in each docstring; ``softplus(x) =
log(1 + e^x) = -log sigmoid(-x)``."""

from __future__ import annotations

import pytest
import torch

from treg_lightning.losses import (
    DPOLoss,
    IPOLoss,
    PreferenceLoss,
    SimPOLoss,
    TokenRewardRegularizer,
)
from treg_lightning.pairs import PairScores

EXACT = {"atol": 1e-12, "rtol": 1e-12}


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def pair(*sequence_values):
    """``PairScores`` from (chosen, rejected, |y_w|, |y_l|[, ref_chosen, ref_rejected]) ``[B]``."""
    return PairScores.from_sequences(*sequence_values)


def test_dpo_hand_computed():
    """beta = 0.1.

    Pair 1: s_w=-10, s_l=-14, ref -12, -13: r_w = 2, r_l = -1, beta*h = 0.3,
        L = softplus(-0.3) = 0.5543552444685271, w = sigmoid(-0.3) = 0.425557483188341.
    Pair 2: s_w=-8, s_l=-3, ref -6, -4: r_w = -2, r_l = 1, beta*h = -0.3,
        L = softplus(0.3) = 0.8543552444685272 (= L_1 + 0.3), w = sigmoid(0.3) = 0.574442516811659.
    Rewards beta*r: (0.2, -0.2) chosen, (-0.1, 0.1) rejected; c = beta = 0.1 for every response.
    """
    out = DPOLoss(beta=0.1)(
        pair(f64(-10, -8), f64(-14, -3), f64(3, 5), f64(4, 2), f64(-12, -6), f64(-13, -4))
    )
    torch.testing.assert_close(out.losses, f64(0.5543552444685271, 0.8543552444685272), **EXACT)
    torch.testing.assert_close(out.weight, f64(0.425557483188341, 0.574442516811659), **EXACT)
    torch.testing.assert_close(out.chosen_rewards, f64(0.2, -0.2), **EXACT)
    torch.testing.assert_close(out.rejected_rewards, f64(-0.1, 0.1), **EXACT)
    torch.testing.assert_close(out.margins, f64(0.3, -0.3), **EXACT)
    torch.testing.assert_close(out.chosen_token_scale, f64(0.1, 0.1), **EXACT)
    torch.testing.assert_close(out.rejected_token_scale, f64(0.1, 0.1), **EXACT)


def test_dpo_label_smoothing_hand_computed():
    """Same pairs, eps = 0.1: L = 0.9 * softplus(-beta h) + 0.1 * softplus(beta h).

    Pair 1 (beta h = 0.3): 0.9 * 0.5543552444685271 + 0.1 * 0.8543552444685272
        = 0.5843552444685272.  Pair 2 (beta h = -0.3): 0.8243552444685273.
    The weight stays the paper's sigmoid(-beta h).
    """
    out = DPOLoss(beta=0.1, label_smoothing=0.1)(
        pair(f64(-10, -8), f64(-14, -3), f64(3, 5), f64(4, 2), f64(-12, -6), f64(-13, -4))
    )
    torch.testing.assert_close(out.losses, f64(0.5843552444685272, 0.8243552444685273), **EXACT)
    torch.testing.assert_close(out.weight, f64(0.425557483188341, 0.574442516811659), **EXACT)


def test_ipo_hand_computed():
    """tau = 0.1, target margin 1/(2 tau) = 5, w = clamp(1 - 2 tau h, 0, 1) = clamp(1 - 0.2 h).

    Pair 1: s_w=-10 (|y_w|=4, ref -20), s_l=-9 (|y_l|=3, ref -6): r_w/4 = 2.5, r_l/3 = -1,
        h = 3.5, L = (3.5 - 5)^2 = 2.25, w = 1 - 0.7 = 0.3.
    Pair 2: s_w=-2 (1, ref -10), s_l=-5 (5, ref -5): 8 and 0, h = 8 past the target:
        L = 9, w = clamp(-0.6) = 0.
    Pair 3: s_w=-10 (2, ref -8), s_l=-4 (2, ref -6): -1 and 1, h = -2: L = 49, w = clamp(1.4) = 1.
    Rewards r/|y|; c = 1/|y|.
    """
    out = IPOLoss(tau=0.1)(
        pair(
            f64(-10, -2, -10),
            f64(-9, -5, -4),
            torch.tensor([4, 1, 2]),
            torch.tensor([3, 5, 2]),
            f64(-20, -10, -8),
            f64(-6, -5, -6),
        )
    )
    torch.testing.assert_close(out.losses, f64(2.25, 9.0, 49.0), **EXACT)
    torch.testing.assert_close(out.weight, f64(0.3, 0.0, 1.0), **EXACT)
    torch.testing.assert_close(out.chosen_rewards, f64(2.5, 8.0, -1.0), **EXACT)
    torch.testing.assert_close(out.rejected_rewards, f64(-1.0, 0.0, 1.0), **EXACT)
    torch.testing.assert_close(out.chosen_token_scale, f64(1 / 4, 1.0, 1 / 2), **EXACT)
    torch.testing.assert_close(out.rejected_token_scale, f64(1 / 3, 1 / 5, 1 / 2), **EXACT)


def test_ipo_loss_is_zero_at_the_target_margin():
    """h = 1/(2 tau) = 2.5 for tau = 0.2: L = 0 and w = 1 - 2 * 0.2 * 2.5 = 0."""
    out = IPOLoss(tau=0.2)(pair(f64(-3.0), f64(-8.0), f64(2), f64(2), f64(-5.0), f64(-5.0)))
    torch.testing.assert_close(out.losses, f64(0.0), **EXACT)
    torch.testing.assert_close(out.weight, f64(0.0), **EXACT)


def test_simpo_hand_computed_and_length_normalized():
    """beta = 2, gamma_beta_ratio = 0.5, so gamma = 1.

    Pair 1: s_w=-6 over 4 tokens, s_l=-12 over 4: h = -1.5 - (-3) = 1.5, beta h - gamma = 2:
        L = softplus(-2) = 0.1269280110429725, w = sigmoid(-2) = 0.11920292202211755.
    Pair 2: the same sums over 2 and 8 tokens: h = -3 - (-1.5) = -1.5, beta h - gamma = -4:
        L = softplus(4) = 4.0181499279178094, w = sigmoid(4) = 0.9820137900379085.
    Rewards beta s/|y|: chosen (-3, -6), rejected (-6, -3); c = beta/|y|: (0.5, 1), (0.5, 0.25).
    Reference log-probs, if given, are ignored.
    """
    loss = SimPOLoss(beta=2.0, gamma_beta_ratio=0.5)
    assert loss.gamma == 1.0
    args = (f64(-6, -6), f64(-12, -12), torch.tensor([4, 2]), torch.tensor([4, 8]))
    out = loss(pair(*args))
    torch.testing.assert_close(out.losses, f64(0.1269280110429725, 4.0181499279178094), **EXACT)
    torch.testing.assert_close(out.weight, f64(0.11920292202211755, 0.9820137900379085), **EXACT)
    torch.testing.assert_close(out.chosen_rewards, f64(-3, -6), **EXACT)
    torch.testing.assert_close(out.rejected_rewards, f64(-6, -3), **EXACT)
    torch.testing.assert_close(out.chosen_token_scale, f64(0.5, 1.0), **EXACT)
    torch.testing.assert_close(out.rejected_token_scale, f64(0.5, 0.25), **EXACT)
    with_ref = loss(pair(*args, f64(100, 100), f64(-100, -100)))
    torch.testing.assert_close(with_ref.losses, out.losses, **EXACT)


LOSSES = [DPOLoss(beta=0.3), IPOLoss(tau=0.25), SimPOLoss(beta=2.5, gamma_beta_ratio=0.4)]
LOSS_IDS = ["dpo", "ipo", "simpo"]


def _random_inputs(seed=0, batch=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (2, batch), generator=g)
    logps = -torch.rand(4, batch, generator=g, dtype=torch.float64) * lengths.repeat(2, 1) * 2
    chosen, rejected, ref_chosen, ref_rejected = logps
    return chosen, rejected, lengths[0], lengths[1], ref_chosen, ref_rejected


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_weight_is_the_magnitude_of_the_loss_gradient(loss):
    """The T-REG rule: ``dL/ds = -k * c(y) * w`` for the chosen sum and ``+k * c(y) * w`` for the
    rejected one, with k = 1 for DPO and SimPO and k = 1/tau for IPO (dL/dh = 2(h - 1/(2 tau))
    = -(1/tau)(1 - 2 tau h)). IPO's clamp only bites outside [0, 1/(2 tau)], so compare there."""
    chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected = _random_inputs()
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    out = loss(pair(chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected))
    out.losses.sum().backward()
    k = 1 / loss.tau if isinstance(loss, IPOLoss) else 1.0
    inside = (out.weight > 0) & (out.weight < 1)
    assert inside.any()
    torch.testing.assert_close(
        chosen.grad[inside], (-k * out.chosen_token_scale * out.weight)[inside], **EXACT
    )
    torch.testing.assert_close(
        rejected.grad[inside], (k * out.rejected_token_scale * out.weight)[inside], **EXACT
    )


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_everything_but_the_loss_is_detached(loss):
    chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected = _random_inputs()
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    out = loss(pair(chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected))
    assert out.losses.requires_grad
    for name in ("chosen_rewards", "rejected_rewards", "chosen_token_scale"):
        assert not getattr(out, name).requires_grad, name
    assert not out.rejected_token_scale.requires_grad
    assert not out.weight.requires_grad
    assert out.losses.shape == out.weight.shape == out.chosen_token_scale.shape == (6,)


def test_protocol_and_reference_flags():
    assert all(isinstance(loss, PreferenceLoss) for loss in LOSSES)
    assert DPOLoss.needs_reference and IPOLoss.needs_reference
    assert not SimPOLoss.needs_reference


@pytest.mark.parametrize("loss", LOSSES[:2], ids=LOSS_IDS[:2])
@pytest.mark.parametrize("missing", ["both", "chosen", "rejected"])
def test_reference_losses_without_reference_raise(loss, missing):
    chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected = _random_inputs()
    if missing in ("both", "chosen"):
        ref_chosen = None
    if missing in ("both", "rejected"):
        ref_rejected = None
    name = type(loss).__name__
    with pytest.raises(ValueError, match=f"{name} needs reference log-probabilities"):
        loss(pair(chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected))


@pytest.mark.parametrize(
    ("build", "parameter"),
    [
        (lambda: DPOLoss(beta=0.0), "beta"),
        (lambda: DPOLoss(beta=-0.1), "beta"),
        (lambda: DPOLoss(label_smoothing=-0.01), "label_smoothing"),
        (lambda: DPOLoss(label_smoothing=0.5), "label_smoothing"),
        (lambda: DPOLoss(label_smoothing=1.0), "label_smoothing"),
        (lambda: IPOLoss(tau=0.0), "tau"),
        (lambda: IPOLoss(tau=-1.0), "tau"),
        (lambda: SimPOLoss(beta=0.0), "beta"),
        (lambda: SimPOLoss(beta=-2.0), "beta"),
        (lambda: SimPOLoss(gamma_beta_ratio=-0.1), "gamma_beta_ratio"),
        (lambda: TokenRewardRegularizer(alpha=-0.1), "alpha"),
        (lambda: TokenRewardRegularizer(weighting="dyn"), "weighting"),
        (lambda: TokenRewardRegularizer(targets="selfish"), "targets"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_parameter(build, parameter):
    with pytest.raises(ValueError, match=parameter):
        build()


def test_valid_edge_hyperparameters_are_accepted():
    DPOLoss(label_smoothing=0.0)
    DPOLoss(label_smoothing=0.49)
    SimPOLoss(gamma_beta_ratio=0.0)
    assert TokenRewardRegularizer(alpha=0.0).alpha == 0.0
