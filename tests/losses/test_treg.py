"""The T-REG regularizer (docs/method.md section 3) on hand-built inputs, for DPO, IPO and SimPO.

    L_REG(x, y) = -c(y) * sum_t r_hat_t * logp_t        (response tokens only)
    L_total     = mean_pairs[ L_seq + alpha * stopgrad(w) * (L_REG(y_w) + L_REG(y_l)) ]

The shared batch (2 pairs, 4 positions; ``.`` = masked out, prompt or padding)::

    chosen   logp   [. -1.0 -2.0 .  ]  [. .  -0.5 -1.5]   s_w = (-3, -2),   |y_w| = (2, 2)
             r_hat  [.  0.4  0.1 .  ]  [. .  -0.2  0.3]   S_w = sum r_hat*logp = (-0.6, -0.35)
    rejected logp   [. -0.5 -3.0 -1.0] [. -2.0  .   . ]   s_l = (-4.5, -2), |y_l| = (3, 1)
             r_hat  [. -0.3  0.1 0.25] [.  0.45 .   . ]   S_l = (-0.4, -0.9)
    reference sums: ref_w = (-3.5, -1.0), ref_l = (-4.0, -2.5);  alpha = 0.25

The sequence losses see ``s = sequence_logps(token_logps, mask)``, so gradients reach each token
both through ``L_seq`` and through ``L_REG``.
"""

from __future__ import annotations

import math

import pytest
import torch

from treg_lightning.losses import (
    ChosenSFT,
    DPOLoss,
    ImplicitRewards,
    IPOLoss,
    SelfGeneratedRewards,
    SimPOLoss,
    TokenRewardRegularizer,
)
from treg_lightning.pairs import PairScores, ResponseScores, sequence_logps

EXACT = {"atol": 1e-12, "rtol": 1e-12}
ALPHA = 0.25
F, T = False, True


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def make_batch():
    return {
        "chosen_token_logps": f64([[0, -1.0, -2.0, 0], [0, 0, -0.5, -1.5]]),
        "chosen_mask": torch.tensor([[F, T, T, F], [F, F, T, T]]),
        "chosen_token_rewards": f64([[0, 0.4, 0.1, 0], [0, 0, -0.2, 0.3]]),
        "rejected_token_logps": f64([[0, -0.5, -3.0, -1.0], [0, -2.0, 0, 0]]),
        "rejected_mask": torch.tensor([[F, T, T, T], [F, T, F, F]]),
        "rejected_token_rewards": f64([[0, -0.3, 0.1, 0.25], [0, 0.45, 0, 0]]),
        "ref_chosen_logps": f64([-3.5, -1.0]),
        "ref_rejected_logps": f64([-4.0, -2.5]),
    }


LOSSES = {
    "dpo": DPOLoss(beta=0.1),
    "ipo": IPOLoss(tau=0.1),
    "simpo": SimPOLoss(beta=2.0, gamma_beta_ratio=0.5),
}

# Hand-computed per loss (see the docstring of test_regularizer_matches_the_formula).
EXPECTED = {
    "dpo": {
        "c_w": [0.1, 0.1],
        "c_l": [0.1, 0.1],
        "w": [0.47502081252106, 0.5374298453437496],
        "L_seq": [0.6443966600735709, 0.770957047789532],
        "L_REG_w": [0.06, 0.035],
        "L_REG_l": [0.04, 0.09],
        "reg": [0.011875520313026501, 0.016794682666992175],
        "total": 0.7220119554215607,
        "static": [0.025, 0.03125],
        "sft": [0.0356265609390795, 0.02687149226718748],
    },
    "ipo": {
        "c_w": [0.5, 0.5],
        "c_l": [1 / 3, 1.0],
        "w": [0.9166666666666666, 1.0],
        "L_seq": [21.006944444444443, 36.0],
        "L_REG_w": [0.3, 0.175],
        "L_REG_l": [0.13333333333333333, 0.9],
        "reg": [0.09930555555555555, 0.26875],
        "total": 28.6875,
        "static": [0.10833333333333334, 0.26875],
        "sft": [0.34375, 0.25],
    },
    "simpo": {
        "c_w": [1.0, 1.0],
        "c_l": [2 / 3, 2.0],
        "w": [0.7310585786300049, 0.2689414213699951],
        "L_seq": [1.3132616875182228, 0.31326168751822286],
        "L_REG_w": [0.6, 0.35],
        "L_REG_l": [0.26666666666666666, 1.8],
        "reg": [0.1583960253698344, 0.14455601398637236],
        "total": 0.9647377071963262,
        "static": [0.21666666666666667, 0.5375],
        "sft": [0.5482939339725037, 0.13447071068499755],
    },
}


def make_pair(batch, leaves, ref_token_logps=None) -> PairScores:
    """The batch's scores: token logps ``leaves``, sums over the masks, the reference sums of
    the batch and, if given, per-token reference logps (used by the implicit targets only)."""
    sides = {}
    for i, side in enumerate(("chosen", "rejected")):
        mask = batch[f"{side}_mask"]
        sides[side] = ResponseScores(
            logps=sequence_logps(leaves[i], mask),
            lengths=mask.sum(-1),
            ref_logps=batch[f"ref_{side}_logps"],
            token_logps=leaves[i],
            mask=mask,
            ref_token_logps=None if ref_token_logps is None else ref_token_logps[i],
            token_rewards=batch[f"{side}_token_rewards"],
        )
    return PairScores(**sides)


def run(loss_name, regularizer, batch=None, ref_token_logps=None):
    """Sequence loss + regularizer on ``batch``; returns (total, out, reg, token-logp leaves)."""
    batch = make_batch() if batch is None else batch
    chosen = batch["chosen_token_logps"].clone().requires_grad_(True)
    rejected = batch["rejected_token_logps"].clone().requires_grad_(True)
    pair = make_pair(batch, (chosen, rejected), ref_token_logps)
    out = LOSSES[loss_name](pair)
    reg = regularizer(pair, out)
    total = (out.losses + reg.losses).mean()
    return total, out, reg, (chosen, rejected)


def grads(total, leaves):
    return torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_regularizer_matches_the_formula(loss_name):
    """Literal values worked out by hand from the batch in the module docstring.

    DPO (beta 0.1): c = 0.1; r_w - r_l = (0.5 - (-0.5), -1 - 0.5) = (1, -1.5);
        w = sigmoid(-0.1), sigmoid(0.15); L_REG_w = -0.1 * S_w = (0.06, 0.035);
        L_REG_l = -0.1 * S_l = (0.04, 0.09); reg = 0.25 * w * (L_REG_w + L_REG_l).
    IPO (tau 0.1): c = 1/|y|: c_w = (1/2, 1/2), c_l = (1/3, 1); h = 0.25 - (-1/6) = 5/12 and
        -0.5 - 0.5 = -1; w = 1 - 0.2 * 5/12 = 11/12 and clamp(1.2) = 1; L_seq = (5/12 - 5)^2,
        (-1 - 5)^2 = 36; L_REG_w = (0.3, 0.175), L_REG_l = (0.4/3, 0.9).
    SimPO (beta 2, gamma 1): c = 2/|y|: c_w = (1, 1), c_l = (2/3, 2); h = -1.5 - (-1.5) = 0 and
        -1 - (-2) = 1; w = sigmoid(1 - 0), sigmoid(1 - 2); L_seq = softplus(1), softplus(-1);
        L_REG_w = (0.6, 0.35), L_REG_l = (0.4 * 2/3, 1.8).
    total = mean(L_seq + reg).
    """
    expected = EXPECTED[loss_name]
    total, out, reg, _ = run(loss_name, TokenRewardRegularizer(alpha=ALPHA))
    torch.testing.assert_close(out.chosen_token_scale, f64(expected["c_w"]), **EXACT)
    torch.testing.assert_close(out.rejected_token_scale, f64(expected["c_l"]), **EXACT)
    torch.testing.assert_close(out.weight, f64(expected["w"]), **EXACT)
    torch.testing.assert_close(out.losses, f64(expected["L_seq"]), **EXACT)
    torch.testing.assert_close(reg.chosen_reg, f64(expected["L_REG_w"]), **EXACT)
    torch.testing.assert_close(reg.rejected_reg, f64(expected["L_REG_l"]), **EXACT)
    torch.testing.assert_close(reg.weight, f64(expected["w"]), **EXACT)
    torch.testing.assert_close(reg.losses, f64(expected["reg"]), **EXACT)
    torch.testing.assert_close(total, torch.tensor(expected["total"], dtype=torch.float64), **EXACT)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_alpha_zero_is_the_plain_loss_bitwise(loss_name):
    """alpha = 0 must reproduce the plain loss exactly, and need no token rewards at all."""
    batch = make_batch()
    batch["chosen_token_rewards"] = batch["rejected_token_rewards"] = None
    regularizer = TokenRewardRegularizer(alpha=0.0)
    assert not regularizer.needs_token_rewards
    total, _, reg, leaves = run(loss_name, regularizer, batch)
    plain_only = _plain_loss(loss_name, batch)
    assert torch.equal(total, plain_only[0])
    assert torch.equal(reg.losses, torch.zeros(2, dtype=torch.float64))
    for ours, plain in zip(grads(total, leaves), grads(plain_only[0], plain_only[1]), strict=True):
        assert torch.equal(ours, plain)


def _plain_loss(loss_name, batch):
    chosen = batch["chosen_token_logps"].clone().requires_grad_(True)
    rejected = batch["rejected_token_logps"].clone().requires_grad_(True)
    out = LOSSES[loss_name](make_pair(batch, (chosen, rejected)))
    return out.losses.mean(), (chosen, rejected)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_no_gradient_flows_through_the_weight(loss_name):
    """d total / d logp_t = d mean(L_seq) / d logp_t + alpha * w * (-c * r_hat_t) / B, with w and
    c constants: compared with that manual gradient, and shown to differ from the gradient one
    would get if w were differentiated (so the check has teeth)."""
    total, out, _, leaves = run(loss_name, TokenRewardRegularizer(alpha=ALPHA))
    batch = make_batch()
    plain_total, plain_leaves = _plain_loss(loss_name, batch)
    seq_grads = grads(plain_total, plain_leaves)
    manual = []
    for side, seq_grad, scale in (
        ("chosen", seq_grads[0], out.chosen_token_scale),
        ("rejected", seq_grads[1], out.rejected_token_scale),
    ):
        rewards = torch.where(batch[f"{side}_mask"], batch[f"{side}_token_rewards"], 0.0)
        reg_grad = ALPHA * out.weight[:, None] * (-scale[:, None] * rewards) / 2
        manual.append(seq_grad + reg_grad)
    ours = grads(total, leaves)
    for got, want in zip(ours, manual, strict=True):
        torch.testing.assert_close(got, want, **EXACT)

    # The same total with a live (differentiable) weight has a different gradient.
    total, out, reg, leaves = run(loss_name, TokenRewardRegularizer(alpha=ALPHA))
    live_weight = _live_weight(loss_name, leaves, batch)
    torch.testing.assert_close(live_weight.detach(), out.weight, **EXACT)
    live_total = (out.losses + ALPHA * live_weight * (reg.chosen_reg + reg.rejected_reg)).mean()
    live = grads(live_total, leaves)
    assert not torch.allclose(live[0], ours[0], atol=1e-6)


def _live_weight(loss_name, leaves, batch):
    chosen_mask, rejected_mask = batch["chosen_mask"], batch["rejected_mask"]
    s_w, s_l = sequence_logps(leaves[0], chosen_mask), sequence_logps(leaves[1], rejected_mask)
    n_w, n_l = chosen_mask.sum(-1), rejected_mask.sum(-1)
    r_w, r_l = s_w - batch["ref_chosen_logps"], s_l - batch["ref_rejected_logps"]
    if loss_name == "dpo":
        return torch.sigmoid(0.1 * (r_l - r_w))
    if loss_name == "ipo":
        return (1 - 2 * 0.1 * (r_w / n_w - r_l / n_l)).clamp(0, 1)
    return torch.sigmoid(1.0 - 2.0 * (s_w / n_w - s_l / n_l))


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("targets", [SelfGeneratedRewards, ImplicitRewards])
@pytest.mark.parametrize("junk", [1e30, -1e30, float("nan"), float("inf")])
def test_masked_tokens_never_count(loss_name, targets, junk):
    """Junk in masked-out positions of log-probs, rewards and reference log-probs changes neither
    the loss nor the gradients, and everything stays finite."""
    regularizer = TokenRewardRegularizer(alpha=ALPHA, targets=targets())
    clean = make_batch()
    ref = (clean["chosen_token_logps"] - 0.3, clean["rejected_token_logps"] + 0.2)
    ref = tuple(torch.where(m, r, 0.0) for m, r in zip(_masks(clean), ref, strict=True))
    clean_total, _, clean_reg, clean_leaves = run(loss_name, regularizer, clean, ref)
    clean_grads = grads(clean_total, clean_leaves)

    dirty = make_batch()
    for side in ("chosen", "rejected"):
        outside = ~dirty[f"{side}_mask"]
        dirty[f"{side}_token_logps"][outside] = junk
        dirty[f"{side}_token_rewards"][outside] = junk
    dirty_ref = tuple(r.masked_fill(~m, junk) for m, r in zip(_masks(dirty), ref, strict=True))
    total, _, reg, leaves = run(loss_name, regularizer, dirty, dirty_ref)
    dirty_grads = grads(total, leaves)

    assert torch.isfinite(total)
    torch.testing.assert_close(total, clean_total, **EXACT)
    torch.testing.assert_close(reg.losses, clean_reg.losses, **EXACT)
    for got, want in zip(dirty_grads, clean_grads, strict=True):
        assert torch.isfinite(got).all(), got
        torch.testing.assert_close(got, want, **EXACT)


def _masks(batch):
    return batch["chosen_mask"], batch["rejected_mask"]


@pytest.mark.parametrize("loss_name", LOSSES)
def test_static_weighting(loss_name):
    """weighting="static": w = 1, reg = alpha * (L_REG_w + L_REG_l); e.g. DPO pair 1:
    0.25 * (0.06 + 0.04) = 0.025."""
    expected = EXPECTED[loss_name]
    _, _, reg, _ = run(loss_name, TokenRewardRegularizer(alpha=ALPHA, weighting="static"))
    torch.testing.assert_close(reg.weight, f64([1.0, 1.0]), **EXACT)
    torch.testing.assert_close(reg.chosen_reg, f64(expected["L_REG_w"]), **EXACT)
    torch.testing.assert_close(reg.losses, f64(expected["static"]), **EXACT)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_sft_target(loss_name):
    """ChosenSFT targets: r_hat = 1 on chosen tokens, rejected contributes 0, so
    L_REG_w = -c_w * s_w, e.g. DPO: -0.1 * (-3, -2) = (0.3, 0.2), reg = 0.25 * w * L_REG_w.
    The cached rewards are not needed (None) and, if present, ignored."""
    expected = EXPECTED[loss_name]
    regularizer = TokenRewardRegularizer(alpha=ALPHA, targets=ChosenSFT())
    assert not regularizer.needs_token_rewards
    batch = make_batch()
    batch["chosen_token_rewards"] = batch["rejected_token_rewards"] = None
    total, out, reg, leaves = run(loss_name, regularizer, batch)
    c_w = f64(expected["c_w"])
    torch.testing.assert_close(reg.chosen_reg, c_w * f64([3.0, 2.0]), **EXACT)
    torch.testing.assert_close(reg.rejected_reg, f64([0.0, 0.0]), **EXACT)
    torch.testing.assert_close(reg.losses, f64(expected["sft"]), **EXACT)
    # The rejected tokens get gradient from L_seq only.
    plain_total, plain_leaves = _plain_loss(loss_name, make_batch())
    torch.testing.assert_close(grads(total, leaves)[1], grads(plain_total, plain_leaves)[1])


def _implicit_reference(scale, token_logps, ref_token_logps, mask):
    """Plain-Python r_hat_t = sigmoid(c * (logp_t - ref_logp_t)) - 0.5 on masked-in tokens."""
    rows = []
    for b in range(token_logps.shape[0]):
        row = []
        for t in range(token_logps.shape[1]):
            if not mask[b, t]:
                row.append(0.0)
                continue
            ref = 0.0 if ref_token_logps is None else float(ref_token_logps[b, t])
            x = float(scale[b]) * (float(token_logps[b, t]) - ref)
            row.append(1 / (1 + math.exp(-x)) - 0.5)
        rows.append(row)
    return f64(rows)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("with_reference", [True, False])
def test_implicit_target(loss_name, with_reference):
    """ImplicitRewards targets: the loss's own implicit token reward, squashed:
    r_hat_t = sigmoid(c (logp_t - ref_logp_t)) - 0.5 for DPO and IPO, and
    sigmoid(c logp_t) - 0.5 for SimPO (reference-free: no reference term even when reference
    token logps are given); detached, so L_REG and its gradient use those r_hat as constants."""
    batch = make_batch()
    ref = None
    if with_reference:
        ref = (
            f64([[0, -1.5, -1.0, 0], [0, 0, -2.5, -1.0]]),
            f64([[0, -0.5, -1.0, -3.0], [0, -1.0, 0, 0]]),
        )
    regularizer = TokenRewardRegularizer(alpha=ALPHA, targets=ImplicitRewards())
    assert not regularizer.needs_token_rewards
    batch["chosen_token_rewards"] = batch["rejected_token_rewards"] = None
    if with_reference is False and loss_name != "simpo":
        with pytest.raises(ValueError, match="relative to the reference"):
            run(loss_name, regularizer, batch, ref)
        return
    total, out, reg, leaves = run(loss_name, regularizer, batch, ref)
    reference_term = None if loss_name == "simpo" else ref

    plain_total, plain_leaves = _plain_loss(loss_name, make_batch())
    seq_grads = grads(plain_total, plain_leaves)
    our_grads = grads(total, leaves)
    for i, side in enumerate(("chosen", "rejected")):
        scale = getattr(out, f"{side}_token_scale")
        mask, logps = batch[f"{side}_mask"], batch[f"{side}_token_logps"]
        r_hat = _implicit_reference(
            scale, logps, None if reference_term is None else reference_term[i], mask
        )
        expected_reg = -scale * (r_hat * logps).sum(-1)
        torch.testing.assert_close(getattr(reg, f"{side}_reg"), expected_reg, **EXACT)
        expected_grad = seq_grads[i] + ALPHA * out.weight[:, None] * (-scale[:, None] * r_hat) / 2
        torch.testing.assert_close(our_grads[i], expected_grad, **EXACT)


def test_self_target_without_cached_rewards_raises():
    regularizer = TokenRewardRegularizer(alpha=ALPHA)
    assert regularizer.needs_token_rewards
    batch = make_batch()
    batch["chosen_token_rewards"] = None
    with pytest.raises(ValueError, match="needs token rewards in the batch"):
        run("dpo", regularizer, batch)


def test_cached_rewards_are_treated_as_constants():
    """A reward tensor that requires grad (e.g. computed in the same graph) gets no gradient."""
    batch = make_batch()
    rewards = batch["chosen_token_rewards"].requires_grad_(True)
    total, _, _, _ = run("simpo", TokenRewardRegularizer(alpha=ALPHA), batch)
    total.backward()
    assert rewards.grad is None


def test_reprs_name_every_setting():
    """What a model summary or a results file prints: the class and its settings."""
    from treg_lightning.losses import DPOLoss, IPOLoss, SimPOLoss
    from treg_lightning.losses.targets import ChosenSFT

    assert repr(DPOLoss(beta=0.1)) == "DPOLoss(beta=0.1, label_smoothing=0.0)"
    assert repr(IPOLoss(tau=0.2)) == "IPOLoss(tau=0.2)"
    assert (
        repr(SimPOLoss(beta=2.5, gamma_beta_ratio=0.3))
        == "SimPOLoss(beta=2.5, gamma_beta_ratio=0.3)"
    )
    assert repr(TokenRewardRegularizer(alpha=0.25)) == (
        "TokenRewardRegularizer(alpha=0.25, weighting='dynamic', targets=SelfGeneratedRewards())"
    )
    regularizer = TokenRewardRegularizer(alpha=0.5, weighting="static", targets=ChosenSFT())
    assert repr(regularizer) == (
        "TokenRewardRegularizer(alpha=0.5, weighting='static', targets=ChosenSFT())"
    )
