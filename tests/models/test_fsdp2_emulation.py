"""FSDP2 as the GPU configs run it, emulated on 2 CPU processes (gloo): the shipped precision
(float32 master weights, ``fsdp_param_dtype: bfloat16`` compute, float32 gradient reduction)
and one gradient sync per optimizer step under gradient accumulation.

One launch of ``fsdp2_steps.py`` trains three runs in turn: ``bf16`` (AdamW, 2 micro-batches
per step), and ``sync_once`` / ``sync_each`` (SGD, 4 micro-batches per step; the second forces
FSDP2's default reduce-scatter after every backward, what Lightning leaves in place). The
references are computed here, in one process, in float32, from the same module and batches.

gloo in torch 2.13 reduce-scatters bfloat16 on CPU as well, so nothing about the collectives is
emulated: the reduction runs in float32 because the shipped ``reduce_dtype`` is float32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fsdp2_steps
import pytest
import torch

from builders import checkout_env, run_in_group

HERE = Path(__file__).resolve().parent
DEVICES = 2
RUNS = {
    "bf16": {"steps": 2, "accumulate": 2, "optimizer": "adamw", "lr": 1e-5,
             "fsdp_param_dtype": "bfloat16"},
    "sync_once": {"steps": 2, "accumulate": 4, "optimizer": "sgd", "lr": 0.05},
    "sync_each": {"steps": 2, "accumulate": 4, "optimizer": "sgd", "lr": 0.05,
                  "sync_every_micro_batch": True},
}  # fmt: skip
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7, the spacing of bfloat16 numbers at 1
pytestmark = pytest.mark.gpu_emulation


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "runs.pt"
    command = [sys.executable, str(HERE / "fsdp2_steps.py"), str(out), str(DEVICES)]
    env = checkout_env(HERE.parent, OMP_NUM_THREADS="1")  # tests/: builders, pair_paths
    run_in_group([*command, json.dumps(RUNS)], timeout=300, env=env)
    return torch.load(out, weights_only=False)


def reference_step(settings, weights, items):
    """Single-process float32: the per-item losses and the gradient of their mean (the global
    batch of one optimizer step: every rank's micro-batches, each of 3 pairs) at ``weights``."""
    module = fsdp2_steps.make_module({**settings, "fsdp_param_dtype": None})
    module.configure_model()
    module.policy.load_state_dict(weights)
    losses = [module.compute_loss(item)[0] for item in items]
    (torch.stack(losses).mean()).backward()
    grads = {n: p.grad for n, p in module.policy.named_parameters()}
    return torch.stack(losses).detach(), grads


def step_items(settings, step):
    """Items of optimizer step ``step`` (1-based), in rank order: rank r's micro-batch j is
    item ``r + DEVICES * j`` (``fsdp2_steps.RankItems``)."""
    items = fsdp2_steps.micro_batches(settings, DEVICES)
    first = (step - 1) * settings["accumulate"]
    return [items[r + DEVICES * j] for r in range(DEVICES)
            for j in range(first, first + settings["accumulate"])]  # fmt: skip


def relative_error(got: dict, want: dict) -> float:
    difference = torch.stack([(got[k].double() - want[k].double()).norm() for k in want]).norm()
    return float(difference / torch.stack([w.double().norm() for w in want.values()]).norm())


def test_shipped_precision_shards_float32_and_computes_bfloat16(runs):
    """Sharded parameters are float32 DTensor shards (half of each on each rank), the forward
    multiplies bfloat16 inputs by bfloat16 weights, AdamW's states are float32, and the
    gradients are reduce-scattered in float32."""
    record = runs["bf16"]
    dtypes = record["dtypes"]
    assert dtypes["all_dtensors"] and dtypes["local_share"] == pytest.approx(1 / DEVICES)
    assert dtypes["sharded"] == ["torch.float32"]
    assert dtypes["forward"] == [("torch.bfloat16", "torch.bfloat16")]
    assert dtypes["optimizer"] == ["torch.float32"]
    assert {d for step in record["reduce_scatters"] for d in step} == {"torch.float32"}
    assert all(w.dtype == torch.float32 for step in record["weights"] for w in step.values())


@pytest.mark.parametrize("step", [1, 2])
def test_bfloat16_losses_and_gradients_equal_float32_single_process(runs, step):
    """At the master weights of each step, every micro-batch's loss and the step's gradient
    (2 ranks x 2 accumulated micro-batches, averaged) equal one float32 process on the same 4
    batches within bfloat16 rounding: the loss within one bf16 spacing at its size, the
    gradient within 4 spacings in norm (measured: 0.03 and 0.7 spacings)."""
    record, settings = runs["bf16"], RUNS["bf16"]
    want_losses, want_grads = reference_step(
        settings, record["weights"][step - 1], step_items(settings, step)
    )
    accumulate = settings["accumulate"]
    columns = slice((step - 1) * accumulate, step * accumulate)
    got_losses = record["losses"][:, columns].reshape(-1)  # rank-major, as step_items
    bound = BF16_EPS * want_losses.abs().max()
    assert (got_losses - want_losses).abs().max() < bound, (got_losses, want_losses)
    assert relative_error(record["grads"][step - 1], want_grads) < 4 * BF16_EPS


def test_adam_updates_the_float32_masters_below_bfloat16_resolution(runs):
    """The first AdamW step moves every master weight by lr * g / (|g| + eps) (m and v
    bias-corrected: g and g^2), computed here in float64 from the step's own gradient, to
    float32 accuracy; the update survives although most of it is below bfloat16's spacing at
    those weights (rounded to bfloat16 they would not have moved: why a "loss falls" check
    with bf16 weights passes or fails by luck)."""
    record, lr = runs["bf16"], RUNS["bf16"]["lr"]
    before, after, grads = record["weights"][0], record["weights"][1], record["grads"][0]
    lost = total = 0
    for name, w0 in before.items():
        g = grads[name].double()
        expected = w0.double() - lr * g / (g.abs() + 1e-8)
        ulp = torch.finfo(torch.float32).eps * w0.double().abs()
        assert ((after[name].double() - expected).abs() <= ulp + 1e-3 * lr).all(), name
        # Adam's first step is lr * sign(g) wherever |g| >> eps: each of those weights moved
        # by lr (to float32 rounding); weights without gradient (unused embeddings) did not.
        assert ((after[name] - w0).abs() > 0.99 * lr)[g.abs() > 1e-6].all(), name
        assert torch.equal(after[name][g == 0], w0[g == 0]), name
        lost += int((after[name].bfloat16() == w0.bfloat16()).sum())
        total += w0.numel()
    assert lost / total > 0.5  # measured: 0.76


def test_one_gradient_sync_per_optimizer_step(runs):
    """4 accumulated micro-batches: one reduce-scatter per FSDP unit per optimizer step (the
    2 decoder layers, the embedding, the root), instead of one per micro-batch."""
    once, each = runs["sync_once"], runs["sync_each"]
    assert once["units"] == each["units"] == 4
    accumulate = RUNS["sync_once"]["accumulate"]
    assert [len(step) for step in once["reduce_scatters"]] == [once["units"]] * 2
    assert [len(step) for step in each["reduce_scatters"]] == [accumulate * each["units"]] * 2


def test_one_sync_per_step_trains_as_syncing_every_micro_batch(runs):
    """The same gradients at each optimizer step and the same weights after it (summed
    unsharded before one reduce-scatter, or reduce-scattered and summed sharded: float32
    reordering only), and the updates are real (SGD, lr 0.05)."""
    once, each = runs["sync_once"], runs["sync_each"]
    for step in (1, 2):
        assert relative_error(once["grads"][step - 1], each["grads"][step - 1]) < 1e-5
        moved = max((each["weights"][step][k] - each["weights"][step - 1][k]).abs().max()
                    for k in each["weights"][0])  # fmt: skip
        assert moved > 1e-3
        for name, weight in each["weights"][step].items():
            torch.testing.assert_close(once["weights"][step][name], weight, atol=1e-6, rtol=0)


def test_lightnings_accumulation_rule_is_pinned():
    """PreferenceModule turns FSDP2's gradient sync on for the micro-batch where Lightning's
    loop steps the optimizer, asking the loop's own (private) rule; a Lightning release
    without it fails here, not on a GPU."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert callable(getattr(trainer.fit_loop, "_should_accumulate", None))
