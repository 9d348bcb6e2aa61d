"""PreferenceModule on the tiny Llama: values against independent references, reference
handling, hyperparameters, schedule and metrics."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from treg_lightning.losses import DPOLoss, LossOutput, SimPOLoss, TokenRewardRegularizer
from treg_lightning.metrics import PreferenceMetrics, SignAgreement, pearson
from treg_lightning.module import PreferenceModule, WarmupCosineLR, concat_pairs

SIDES = ("chosen", "rejected")


def make_batch(seed: int = 0, batch: int = 2, lengths=(12, 9), prompt: int = 5, vocab: int = 256):
    """A contract batch: right padding (row 1 has 2 padding tokens), response after `prompt`."""
    g = torch.Generator().manual_seed(seed)
    out = {"index": torch.arange(batch)}
    for side, length in zip(SIDES, lengths, strict=True):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        attention = torch.ones(batch, length, dtype=torch.long)
        attention[1, -2:] = 0
        response = torch.zeros(batch, length, dtype=torch.bool)
        response[:, prompt:] = True
        response &= attention.bool()
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = attention
        out[f"{side}_response_mask"] = response
        out[f"{side}_token_rewards"] = (torch.rand(batch, length, generator=g) - 0.5) * response
    return out


def naive_token_logps(lm, input_ids, attention_mask, response_mask):
    """Full-logits log_softmax + gather, one side at a time: the independent reference."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logps = torch.cat([torch.zeros_like(logps[:, :1]), logps], dim=1)
    return torch.where(response_mask, logps, 0.0)


@pytest.fixture(scope="module")
def simpo_module(tiny_model_dir):
    module = PreferenceModule(
        str(tiny_model_dir),
        loss=SimPOLoss(beta=2.0, gamma_beta_ratio=0.5),
        regularizer=TokenRewardRegularizer(alpha=0.5),
    )
    module.configure_model()
    return module


def test_concat_pairs_pads_to_longer_side():
    batch = make_batch()
    pair = concat_pairs(batch, pad_id=7)
    assert pair["input_ids"].shape == (4, 12)
    assert (pair["input_ids"][2:, 9:] == 7).all()
    assert not pair["attention_mask"][2:, 9:].any() and not pair["response_mask"][2:, 9:].any()
    torch.testing.assert_close(pair["input_ids"][:2], batch["chosen_input_ids"])


def test_forward_logps_equal_full_logits_per_side(simpo_module):
    batch = make_batch()
    logps = simpo_module.forward_logps(batch)
    for side in SIDES:
        expected = naive_token_logps(
            simpo_module.policy,
            batch[f"{side}_input_ids"],
            batch[f"{side}_attention_mask"],
            batch[f"{side}_response_mask"],
        )
        torch.testing.assert_close(logps[f"{side}_token_logps"], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logps[f"{side}_logps"], expected.sum(-1), atol=1e-4, rtol=1e-5)


def test_simpo_treg_loss_equals_formula(simpo_module):
    """L = -log sigmoid(beta*h - gamma) + alpha*w*(-c_w sum r*logp_w - c_l sum r*logp_l),
    h = s_w/|y_w| - s_l/|y_l|, w = sigmoid(gamma - beta*h), c = beta/|y|."""
    batch = make_batch(seed=3)
    beta, gamma, alpha = 2.0, 1.0, 0.5
    token_logps, lengths, s = {}, {}, {}
    for side in SIDES:
        mask = batch[f"{side}_response_mask"]
        token_logps[side] = naive_token_logps(
            simpo_module.policy, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], mask
        ).detach()
        lengths[side] = mask.sum(-1).float()
        s[side] = token_logps[side].sum(-1)
    h = s["chosen"] / lengths["chosen"] - s["rejected"] / lengths["rejected"]
    seq = -F.logsigmoid(beta * h - gamma)
    w = torch.sigmoid(gamma - beta * h)
    reg = sum(
        -(beta / lengths[side]) * (batch[f"{side}_token_rewards"] * token_logps[side]).sum(-1)
        for side in SIDES
    )
    expected = (seq + alpha * w * reg).mean()
    loss, outputs = simpo_module.compute_loss(batch)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert outputs["ref"] is None  # SimPO is reference-free: no reference model, no ref logps
    assert simpo_module.reference is None
    loss.backward()
    grads = [p.grad for p in simpo_module.policy.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    simpo_module.policy.zero_grad()


def test_dpo_live_reference_is_frozen_and_outside_optimizer(tiny_model_dir):
    module = PreferenceModule(
        str(tiny_model_dir), loss=DPOLoss(beta=0.1), regularizer=None, scheduler=None
    )
    module.configure_model()
    module.configure_model()  # idempotent
    assert module.reference is not None and module.reference is not module.policy
    assert not any(p.requires_grad for p in module.reference.parameters())
    module.train()
    assert not module.reference.training and module.policy.training
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.policy.parameters()}
    # Policy == reference at start: every implicit reward is 0 and the DPO loss is log 2.
    loss, outputs = module.compute_loss(make_batch())
    torch.testing.assert_close(loss.detach(), torch.tensor(math.log(2.0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["loss_output"].chosen_rewards, torch.zeros(2))


def test_cached_reference_logps_are_used(tiny_model_dir):
    """With cached ref logps 1 below the policy's on every chosen token (and equal on rejected),
    r_w = |y_w|, r_l = 0 and the DPO loss is -log sigmoid(beta * |y_w|)."""
    module = PreferenceModule(
        str(tiny_model_dir), loss=DPOLoss(beta=0.1), regularizer=None, live_reference=False
    )
    module.configure_model()
    assert module.reference is None
    batch = make_batch()
    with torch.no_grad():
        logps = module.forward_logps(batch)
    for side, shift in (("chosen", 1.0), ("rejected", 0.0)):
        mask = batch[f"{side}_response_mask"]
        batch[f"{side}_ref_token_logps"] = torch.where(
            mask, logps[f"{side}_token_logps"] - shift, 0.0
        )
    loss, _ = module.compute_loss(batch)
    chosen_lengths = batch["chosen_response_mask"].sum(-1).float()
    expected = -F.logsigmoid(0.1 * chosen_lengths).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_reference_needed_but_disabled_fails_at_start_up(tiny_model_dir, tmp_path):
    """DPO, live_reference=False, data without cached reference logps: fit stops before any
    annotation or model loading, with a message that says what to change."""
    from treg_lightning.data.datamodule import PreferenceDataModule

    module = PreferenceModule(str(tiny_model_dir), loss=DPOLoss(beta=0.1), live_reference=False)
    data = PreferenceDataModule(
        "demo",
        tokenizer=str(tiny_model_dir),
        store_reference_logps=False,
        cache_dir=str(tmp_path / "cache"),
        max_length=64,
        max_prompt_length=32,
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="live_reference.*store_reference_logps"):
        trainer.fit(module, datamodule=data)
    assert module.policy is None  # failed before configure_model
    assert not (tmp_path / "cache").exists()  # and before the annotate pass


def test_hyperparameters_reload_without_cli(tiny_model_dir, tmp_path):
    module = PreferenceModule(
        str(tiny_model_dir),
        loss=DPOLoss(beta=0.05),
        regularizer=TokenRewardRegularizer(alpha=0.1, weighting="static"),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    module.configure_model()
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # loadable without unpickling objects
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])
    reloaded = PreferenceModule.load_from_checkpoint(path)
    assert isinstance(reloaded.loss, DPOLoss) and reloaded.loss.beta == 0.05
    assert reloaded.regularizer.alpha == 0.1 and reloaded.regularizer.weighting == "static"
    assert reloaded.reference is not None  # rebuilt from reference_model, not from the file
    for key, value in module.policy.state_dict().items():
        torch.testing.assert_close(reloaded.policy.state_dict()[key], value)


def test_warmup_cosine_schedule_values():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = WarmupCosineLR(optimizer, warmup_ratio=0.2, num_training_steps=10)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup = ceil(0.2 * 10) = 2 steps: 0, 1, then cosine over the 8 remaining steps.
    expected = [0.0, 1.0] + [1.0 + math.cos(math.pi * k / 8) for k in range(9)]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(expected))


def test_sign_agreement_and_pearson_by_hand():
    preds = torch.tensor([0.5, -0.2, 0.1, -0.4, 0.3])
    target = torch.tensor([0.1, 0.2, 0.0, -0.3, -0.1])
    mask = torch.tensor([True, True, True, True, False])
    metric = SignAgreement()
    metric.update(preds, target, mask)
    # counted (mask and target != 0): 0, 1, 3 -> signs agree at 0 and 3.
    torch.testing.assert_close(metric.compute(), torch.tensor(2 / 3))
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 1.0, 4.0, 3.0])
    # cov = 3 (sum of products of deviations), |x - mean| = |y - mean| = sqrt(5): r = 0.6.
    torch.testing.assert_close(pearson(x, y), torch.tensor(0.6))


def test_preference_metrics_values():
    out = LossOutput(
        losses=torch.zeros(2),
        chosen_rewards=torch.tensor([1.0, -1.0]),
        rejected_rewards=torch.tensor([0.0, 0.5]),
        chosen_token_scale=torch.tensor([1.0, 2.0]),
        rejected_token_scale=torch.tensor([1.0, 1.0]),
        weight=torch.tensor([0.25, 0.75]),
    )
    mask = torch.tensor([[False, True, True], [False, True, False]])
    batch = {
        "chosen_response_mask": mask,
        "rejected_response_mask": mask,
        "chosen_token_rewards": torch.tensor([[0.0, 0.2, -0.1], [0.0, 0.3, 0.0]]),
        "rejected_token_rewards": torch.tensor([[0.0, -0.2, 0.1], [0.0, 0.1, 0.0]]),
    }
    logps = {
        "chosen_logps": torch.tensor([-3.0, -5.0]),
        "rejected_logps": torch.tensor([-4.0, -6.0]),
        "chosen_token_logps": torch.tensor([[0.0, -1.0, -2.0], [0.0, -1.0, 0.0]]),
        "rejected_token_logps": torch.tensor([[0.0, -1.0, -3.0], [0.0, -2.0, 0.0]]),
    }
    # Reference logps -1.5 everywhere: implicit rewards c * (logp + 1.5).
    ref = {f"{s}_ref_token_logps": torch.full((2, 3), -1.5) for s in SIDES}
    metrics = PreferenceMetrics()
    updated = metrics.update_from(batch, out, None, logps, ref)
    assert "treg" not in updated  # no regularizer output: the T-REG term is not logged
    values = {name: float(metric.compute()) for name, metric in updated.items()}
    assert values["reward_accuracy"] == pytest.approx(0.5)
    assert values["margin"] == pytest.approx(((1 - 0) + (-1 - 0.5)) / 2)
    assert values["weight"] == pytest.approx(0.5)
    assert values["chosen_logps"] == pytest.approx(-4.0)
    # implicit chosen: row0 [0.5, -0.5], row1 [1.0]; rejected: row0 [0.5, -1.5], row1 [-0.5]
    # r_hat chosen: [0.2, -0.1], [0.3]; rejected: [-0.2, 0.1], [0.1] -> agree 3 of 6.
    assert values["token_sign_agreement"] == pytest.approx(0.5)
    preds = torch.tensor([0.5, -0.5, 1.0, 0.5, -1.5, -0.5])
    target = torch.tensor([0.2, -0.1, 0.3, -0.2, 0.1, 0.1])
    expected = torch.corrcoef(torch.stack([preds, target]))[0, 1]
    assert values["token_reward_pearson"] == pytest.approx(float(expected), abs=1e-6)


def test_packed_forward_equals_padded(simpo_module, tiny_model_dir):
    """packing=True (one padding-free row, block-diagonal mask on sdpa) gives the padded path's
    token log-probs, loss and gradients."""
    packed = PreferenceModule(
        str(tiny_model_dir), loss=SimPOLoss(beta=2.0), regularizer=TokenRewardRegularizer(0.5),
        packing=True,
    )  # fmt: skip
    packed.configure_model()
    packed.policy.load_state_dict(simpo_module.policy.state_dict())
    batch = make_batch(seed=5)
    expected = simpo_module.forward_logps(batch)
    got = packed.forward_logps(batch)
    for key in ("chosen_token_logps", "rejected_token_logps", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)
    loss_packed, _ = packed.compute_loss(batch)
    loss_padded, _ = simpo_module.compute_loss(batch)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    loss_packed.backward()
    loss_padded.backward()
    grad_packed = packed.policy.model.layers[0].mlp.up_proj.weight.grad
    grad_padded = simpo_module.policy.model.layers[0].mlp.up_proj.weight.grad
    torch.testing.assert_close(grad_packed, grad_padded, atol=1e-5, rtol=1e-4)
    simpo_module.policy.zero_grad()


def test_undefined_pearson_counts_with_weight_zero():
    """All implicit rewards 0 (policy == reference): no correlation. The metric is still
    updated (every rank must sync the same metrics) but the batch does not count."""
    mask = torch.tensor([[False, True, True]])
    batch = {
        "chosen_response_mask": mask,
        "rejected_response_mask": mask,
        "chosen_token_rewards": torch.tensor([[0.0, 0.2, -0.1]]),
        "rejected_token_rewards": torch.tensor([[0.0, -0.3, 0.1]]),
    }
    out = LossOutput(*(torch.ones(1) for _ in range(6)))
    zeros = {f"{s}_token_logps": torch.zeros(1, 3) for s in SIDES}
    logps = {**zeros, "chosen_logps": torch.zeros(1), "rejected_logps": torch.zeros(1)}
    ref = {f"{s}_ref_token_logps": torch.zeros(1, 3) for s in SIDES}
    metrics = PreferenceMetrics()
    assert "token_reward_pearson" in metrics.update_from(batch, out, None, logps, ref)
    moved = {**logps, "chosen_token_logps": torch.tensor([[0.0, -1.0, -2.0]])}
    metrics.update_from(batch, out, None, moved, ref)
    # second batch: preds [-1, -2, 0, 0] vs [0.2, -0.1, -0.3, 0.1]; r = -0.075 / norms
    preds = torch.tensor([-1.0, -2.0, 0.0, 0.0])
    target = torch.tensor([0.2, -0.1, -0.3, 0.1])
    expected = torch.corrcoef(torch.stack([preds, target]))[0, 1]
    assert abs(float(expected)) > 0.1
    assert float(metrics["token_reward_pearson"].compute()) == pytest.approx(float(expected))


def test_compiled_layers_give_the_same_loss(simpo_module, tiny_model_dir):
    """compile=True wraps every decoder layer in torch.compile (dynamo traces them; the "eager"
    backend keeps the test fast) and changes no value."""
    compiled = PreferenceModule(
        str(tiny_model_dir), loss=SimPOLoss(beta=2.0, gamma_beta_ratio=0.5),
        regularizer=TokenRewardRegularizer(alpha=0.5), compile=True,
        compile_options={"backend": "eager"},
    )  # fmt: skip
    compiled.configure_model()
    compiled.policy.load_state_dict(simpo_module.policy.state_dict())
    layers = compiled.policy.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    batch = make_batch(seed=6)
    torch.testing.assert_close(
        compiled.compute_loss(batch)[0], simpo_module.compute_loss(batch)[0], atol=1e-6, rtol=1e-6
    )
