"""PreferenceModule on the tiny Llama: values against independent references, reference
handling, hyperparameters, schedule and metrics."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from builders import pair_batch as make_batch
from treg_lightning.forward.batch import concat_pairs
from treg_lightning.losses import DPOLoss, ImplicitRewards, SimPOLoss, TokenRewardRegularizer
from treg_lightning.module import PreferenceModule

SIDES = ("chosen", "rejected")


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
        torch.testing.assert_close(logps[side], expected, atol=1e-5, rtol=1e-5)
        pair = simpo_module.pair_scores(batch)
        scores = getattr(pair, side)
        torch.testing.assert_close(scores.logps, expected.sum(-1), atol=1e-4, rtol=1e-5)


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
    assert not outputs["pair"].has_reference  # SimPO is reference-free: no ref logps
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
        batch[f"{side}_ref_token_logps"] = torch.where(mask, logps[side] - shift, 0.0)
    loss, _ = module.compute_loss(batch)
    chosen_lengths = batch["chosen_response_mask"].sum(-1).float()
    expected = -F.logsigmoid(0.1 * chosen_lengths).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_reference_needed_but_disabled_fails_at_start_up(tiny_model_dir, tmp_path):
    """DPO, live_reference=False, a reward source that caches no reference logps: fit stops
    before any annotation or model loading, with a message that says what to change."""
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.rewards import ContrastiveRewards

    module = PreferenceModule(str(tiny_model_dir), loss=DPOLoss(beta=0.1), live_reference=False)
    data = PreferenceDataModule(
        "demo",
        tokenizer=str(tiny_model_dir),
        rewards=ContrastiveRewards(store_reference_logps=False, cache_dir=str(tmp_path / "cache")),
        max_length=64,
        max_prompt_length=32,
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="live_reference.*store_reference_logps"):
        trainer.fit(module, datamodule=data)
    assert module.policy is None  # failed before configure_model
    assert not (tmp_path / "cache").exists()  # and before the annotate pass


def test_regularizer_without_token_rewards_fails_at_start_up(tiny_model_dir, monkeypatch):
    """data.rewards=None and alpha > 0: the T-REG term would silently vanish; refused before
    any model is loaded, naming both settings. alpha = 0 trains with the same data."""
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.models import loading as models

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    data = PreferenceDataModule(
        "demo", tokenizer=str(tiny_model_dir), rewards=None, max_length=64, max_prompt_length=32,
        limit=4,
    )  # fmt: skip
    module = PreferenceModule(
        str(tiny_model_dir), loss=SimPOLoss(), regularizer=TokenRewardRegularizer(alpha=0.25)
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    monkeypatch.setattr(models, "load_causal_lm", no_load)
    with pytest.raises(ValueError, match=r"model\.regularizer \(alpha 0.25.*data\.rewards is null"):
        trainer.fit(module, datamodule=data)
    assert module.policy is None
    monkeypatch.undo()
    plain = PreferenceModule(
        str(tiny_model_dir), loss=SimPOLoss(), regularizer=TokenRewardRegularizer(alpha=0.0)
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(plain, datamodule=data)
    assert trainer.global_step == 1


def test_simpo_ignores_cached_reference_logps(simpo_module):
    """SimPO is reference-free: cached reference token logps in the batch reach neither the
    loss, the regularizer's targets nor the metrics (docs/method.md section 3)."""
    batch = make_batch(seed=4)
    loss, outputs = simpo_module.compute_loss(batch)
    with_ref = {**batch}
    for side in SIDES:
        with_ref[f"{side}_ref_token_logps"] = torch.full_like(batch[f"{side}_token_rewards"], -9.0)
    loss_ref, outputs_ref = simpo_module.compute_loss(with_ref)
    assert not outputs_ref["pair"].has_reference
    assert torch.equal(loss_ref, loss)


def test_hyperparameters_reload_without_cli(tiny_model_dir, tmp_path):
    module = PreferenceModule(
        str(tiny_model_dir),
        loss=DPOLoss(beta=0.05),
        regularizer=TokenRewardRegularizer(
            alpha=0.1, weighting="static", targets=ImplicitRewards()
        ),
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
    assert type(reloaded.regularizer.targets).__name__ == "ImplicitRewards"
    assert reloaded.reference is not None  # rebuilt from reference_model, not from the file
    for key, value in module.policy.state_dict().items():
        torch.testing.assert_close(reloaded.policy.state_dict()[key], value)


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
    expected = simpo_module.pair_scores(batch)
    got = packed.pair_scores(batch)
    for side in SIDES:
        for name in ("token_logps", "logps"):
            torch.testing.assert_close(
                getattr(getattr(got, side), name),
                getattr(getattr(expected, side), name),
                atol=1e-5,
                rtol=1e-5,
            )
    loss_packed, _ = packed.compute_loss(batch)
    loss_padded, _ = simpo_module.compute_loss(batch)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    loss_packed.backward()
    loss_padded.backward()
    grad_packed = packed.policy.model.layers[0].mlp.up_proj.weight.grad
    grad_padded = simpo_module.policy.model.layers[0].mlp.up_proj.weight.grad
    torch.testing.assert_close(grad_packed, grad_padded, atol=1e-5, rtol=1e-4)
    simpo_module.policy.zero_grad()


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
