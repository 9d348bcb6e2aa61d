"""Our sequence losses against TRL 1.x, the independent reference implementation.

Oracles (TRL 1.16, read from ``trl/experimental/cpo/cpo_trainer.py`` and
``trl/trainer/dpo_trainer.py``):

- SimPO: ``trl.experimental.cpo.CPOTrainer.cpo_loss(self, policy_chosen_logps,
  policy_rejected_logps)`` with ``loss_type="simpo"``, called unbound on a ``SimpleNamespace``
  carrying the attributes it reads (``alpha``, ``beta``, ``simpo_gamma``, ``label_smoothing``,
  ``loss_type``, ``accelerator.device``). For SimPO the CPO trainer feeds it length-AVERAGED
  log-probs (``average_log_prob=self.loss_type in ["ipo", "simpo"]``), so we pass ``s / |y|``.
  TRL's ``simpo_gamma`` is the absolute margin: ``simpo_gamma = gamma_beta_ratio * beta``.
- DPO (sigmoid) and IPO: ``trl.DPOTrainer._compute_loss(model, inputs, return_outputs=False)``,
  the trainer's own loss routine, on a ``DPOTrainer`` built around a tiny random float64
  ``LlamaForCausalLM`` and a local word-level tokenizer, on a batch made by the trainer's own
  collator (``DataCollatorForPreference``). TRL's fused LM head always projects in float32, so
  for the float64 comparison the policy and reference passed to ``_compute_loss`` are thin
  wrappers that return TRL's own ``selective_log_softmax`` of the float64 logits in the
  ``log_probs`` field that ``_compute_loss`` reads; everything downstream (log-ratios, IPO's
  length normalization by the completion mask, the loss, the mean) is TRL's code. A second test
  drives the unmodified trainer (fused float32 head) end to end, at float32 tolerance.
- DPO with label smoothing (cDPO): TRL 1.16 dropped ``label_smoothing`` from the DPO ``sigmoid``
  loss (it is only read by ``robust``, ``exo_pair`` and ``aot``, which are different formulas).
  The closest TRL function computing the same formula is ``CPOTrainer.cpo_loss`` with
  ``loss_type="sigmoid"``: ``-(1-eps) logsigmoid(beta*z) - eps logsigmoid(-beta*z)`` with
  ``z = chosen - rejected``; fed the log-ratios ``s - s_ref`` it is exactly cDPO.
"""

from __future__ import annotations

import types

import pytest
import torch

from builders import tiny_llama, word_tokenizer
from treg_lightning.forward.logprobs import token_logps_from_hidden
from treg_lightning.losses import DPOLoss, IPOLoss, SimPOLoss
from treg_lightning.pairs import PairScores, sequence_logps

trl = pytest.importorskip("trl")
CPOTrainer = pytest.importorskip("trl.experimental.cpo").CPOTrainer
trl_utils = pytest.importorskip("trl.trainer.utils")

TIGHT = {"atol": 1e-9, "rtol": 1e-9}


def _cpo_self(loss_type: str, beta: float, simpo_gamma: float = 0.0, label_smoothing: float = 0.0):
    """The attributes ``CPOTrainer.cpo_loss`` reads, without building a trainer."""
    return types.SimpleNamespace(
        alpha=0.0,  # AlphaPO transform off
        beta=beta,
        simpo_gamma=simpo_gamma,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )


def _random_pairs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 40, (batch,), generator=g)
    rejected_lengths = torch.randint(1, 40, (batch,), generator=g)
    # Summed log-probs of plausible size: about -1.5 nats per token, with spread.
    chosen = -(1.5 + torch.rand(batch, generator=g, dtype=torch.float64)) * chosen_lengths
    rejected = -(1.5 + torch.rand(batch, generator=g, dtype=torch.float64)) * rejected_lengths
    ref_chosen = chosen + torch.randn(batch, generator=g, dtype=torch.float64) * 3
    ref_rejected = rejected + torch.randn(batch, generator=g, dtype=torch.float64) * 3
    return chosen, rejected, chosen_lengths, rejected_lengths, ref_chosen, ref_rejected


def _leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize(
    ("beta", "gamma_beta_ratio"), [(2.0, 0.5), (10.0, 0.3), (2.5, 0.0), (0.7, 1.4)]
)
def test_simpo_matches_trl_cpo_loss(beta, gamma_beta_ratio):
    chosen, rejected, chosen_len, rejected_len, _, _ = _random_pairs(16, seed=1)
    ours_chosen, ours_rejected = _leaves(chosen, rejected)
    out = SimPOLoss(beta=beta, gamma_beta_ratio=gamma_beta_ratio)(
        PairScores.from_sequences(ours_chosen, ours_rejected, chosen_len, rejected_len)
    )
    out.losses.sum().backward()

    trl_chosen, trl_rejected = _leaves(chosen, rejected)
    oracle = _cpo_self("simpo", beta, simpo_gamma=gamma_beta_ratio * beta)
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = CPOTrainer.cpo_loss(
        oracle, trl_chosen / chosen_len, trl_rejected / rejected_len
    )
    trl_losses.sum().backward()

    assert out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, trl_losses, **TIGHT)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen_rewards, **TIGHT)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected_rewards, **TIGHT)
    torch.testing.assert_close(ours_chosen.grad, trl_chosen.grad, **TIGHT)
    torch.testing.assert_close(ours_rejected.grad, trl_rejected.grad, **TIGHT)


@pytest.mark.parametrize(("beta", "label_smoothing"), [(0.1, 0.0), (0.1, 0.1), (0.5, 0.3)])
def test_dpo_label_smoothing_matches_trl_sigmoid_formula(beta, label_smoothing):
    """cDPO against ``CPOTrainer.cpo_loss(loss_type="sigmoid")`` fed the log-ratios."""
    chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected = _random_pairs(16, 2)
    ours_chosen, ours_rejected = _leaves(chosen, rejected)
    out = DPOLoss(beta=beta, label_smoothing=label_smoothing)(
        PairScores.from_sequences(
            ours_chosen, ours_rejected, chosen_len, rejected_len, ref_chosen, ref_rejected
        )
    )
    out.losses.sum().backward()

    trl_chosen, trl_rejected = _leaves(chosen, rejected)
    oracle = _cpo_self("sigmoid", beta, label_smoothing=label_smoothing)
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = CPOTrainer.cpo_loss(
        oracle, trl_chosen - ref_chosen, trl_rejected - ref_rejected
    )
    trl_losses.sum().backward()

    torch.testing.assert_close(out.losses, trl_losses, **TIGHT)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen_rewards, **TIGHT)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected_rewards, **TIGHT)
    torch.testing.assert_close(ours_chosen.grad, trl_chosen.grad, **TIGHT)
    torch.testing.assert_close(ours_rejected.grad, trl_rejected.grad, **TIGHT)


# --- model-level comparison with DPOTrainer ---------------------------------------------------

VOCAB = 64
PAD, UNK, EOS = 0, 1, 2
# Pairs of different prompt and response lengths, so padding and length normalization matter.
EXAMPLES = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, EOS], "rejected_ids": [10, EOS]},
    {"prompt_ids": [11, 12], "chosen_ids": [13, EOS], "rejected_ids": [14, 15, 16, 17, EOS]},
    {
        "prompt_ids": [20, 21, 22, 23, 24],
        "chosen_ids": [25, 26, 27, 28, EOS],
        "rejected_ids": [EOS],
    },
]


def _tiny_llama(seed: int):
    model = tiny_llama(
        VOCAB, seed, torch.float64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
    ).train()  # fmt: skip
    # Random init gives nearly uniform next-token distributions; sharpen the head so log-probs
    # (and so the losses and their gradients) vary between tokens.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def _dpo_trainer(tmp_path, loss_type: str, beta: float):
    from datasets import Dataset

    config = trl.DPOConfig(
        output_dir=str(tmp_path),
        loss_type=[loss_type],
        beta=beta,
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=len(EXAMPLES),
    )
    # The dataset only has to be valid for the constructor; the batch under test is collated
    # below from EXAMPLES with the trainer's own collator.
    dataset = Dataset.from_dict({"prompt": ["t5 t6"], "chosen": [" t7"], "rejected": [" t8"]})
    trainer = trl.DPOTrainer(
        model=_tiny_llama(seed=0),
        ref_model=_tiny_llama(seed=1),
        args=config,
        train_dataset=dataset,
        processing_class=word_tokenizer(VOCAB),
    )
    trainer.model.train()
    return trainer, trainer.data_collator(EXAMPLES)


class _Float64LogProbs:
    """Stands in for TRL's fused-head forward: same call, ``log_probs`` from float64 logits.

    ``model(input_ids, attention_mask, labels=..., fused_lm_head=True).log_probs[b, t]`` is
    ``log p(labels[b, t+1])`` (0 where the label is -100), computed with TRL's own
    ``selective_log_softmax``. Metrics-only fields are zeros.
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, *, labels, fused_lm_head, **model_kwargs):
        assert fused_lm_head
        logits = self.model(**model_kwargs).logits[:, :-1]  # original forward, float64
        shifted = labels[:, 1:]
        log_probs = trl_utils.selective_log_softmax(logits, shifted.clamp(min=0))
        log_probs = log_probs.masked_fill(shifted == -100, 0.0)
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(
            log_probs=log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
        )


def _our_out(trainer, batch, loss_fn):
    """Our path: backbone hidden states + chunked token log-probs + our loss."""
    mask = batch["completion_mask"].bool()

    def summed_logps(model):
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        token_logps = token_logps_from_hidden(
            hidden, model.lm_head.weight, batch["input_ids"], mask, chunk_size=3
        )
        return sequence_logps(token_logps, mask).chunk(2)

    chosen_logps, rejected_logps = summed_logps(trainer.model)
    with torch.no_grad():
        ref_chosen_logps, ref_rejected_logps = summed_logps(trainer.ref_model)
    chosen_lengths, rejected_lengths = mask.sum(-1).chunk(2)
    pair = PairScores.from_sequences(
        chosen_logps,
        rejected_logps,
        chosen_lengths,
        rejected_lengths,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    return loss_fn(pair)


def _our_mean_loss(trainer, batch, loss_fn):
    return _our_out(trainer, batch, loss_fn).losses.mean()


def _loss_and_grads(trainer, compute):
    trainer.model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("loss_type", "ours"),
    [("sigmoid", DPOLoss(beta=0.1)), ("sigmoid", DPOLoss(beta=0.5)), ("ipo", IPOLoss(tau=0.1))],
    ids=["dpo-beta0.1", "dpo-beta0.5", "ipo-tau0.1"],
)
def test_dpo_and_ipo_match_trl_dpo_trainer_float64(tmp_path, loss_type, ours):
    beta = ours.tau if loss_type == "ipo" else ours.beta  # TRL's beta is IPO's tau
    trainer, batch = _dpo_trainer(tmp_path, loss_type, beta)
    policy, reference = _Float64LogProbs(trainer.model), _Float64LogProbs(trainer.ref_model)
    trainer.ref_model = reference

    trl_loss, trl_grads = _loss_and_grads(
        trainer, lambda: trainer._compute_loss(policy, batch, False)
    )
    trainer.ref_model = reference.model
    our_loss, our_grads = _loss_and_grads(trainer, lambda: _our_mean_loss(trainer, batch, ours))

    assert trl_loss.dtype == our_loss.dtype == torch.float64
    assert trl_loss.abs() > 1e-3  # a non-trivial value
    torch.testing.assert_close(our_loss, trl_loss, atol=1e-9, rtol=1e-9)
    assert our_grads.keys() == trl_grads.keys()
    for name, grad in trl_grads.items():
        assert grad.abs().max() > 0 or "embed" in name, name
        torch.testing.assert_close(our_grads[name], grad, atol=1e-9, rtol=1e-7, msg=name)
    if loss_type == "sigmoid":  # TRL logs the mean of beta * (r_w - r_l): our DPO margin
        (trl_margin,) = trainer._metrics["train"]["rewards/margins"]
        assert trl_margin == pytest.approx(_our_out(trainer, batch, ours).margins.mean().item())

    # Per pair: TRL on one-pair batches (no padding) against our per-pair losses on the padded
    # batch (right padding under causal attention leaves the real tokens' log-probs unchanged).
    with torch.no_grad():
        our_losses = _our_out(trainer, batch, ours).losses
        trainer.ref_model = reference
        trl_losses = [
            trainer._compute_loss(policy, trainer.data_collator([example]), False)
            for example in EXAMPLES
        ]
    torch.testing.assert_close(our_losses, torch.stack(trl_losses), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    ("loss_type", "ours"),
    [("sigmoid", DPOLoss(beta=0.1)), ("ipo", IPOLoss(tau=0.1))],
    ids=["dpo", "ipo"],
)
def test_dpo_and_ipo_match_unmodified_trl_trainer(tmp_path, loss_type, ours):
    """End to end through TRL's real fused LM head, which computes log-probs in float32."""
    beta = ours.tau if loss_type == "ipo" else ours.beta
    trainer, batch = _dpo_trainer(tmp_path, loss_type, beta)
    trl_loss, trl_grads = _loss_and_grads(
        trainer, lambda: trainer._compute_loss(trainer.model, batch, False)
    )
    our_loss, our_grads = _loss_and_grads(trainer, lambda: _our_mean_loss(trainer, batch, ours))

    torch.testing.assert_close(our_loss, trl_loss.to(our_loss.dtype), atol=1e-5, rtol=1e-5)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
