"""Shared-prompt forward: the layout and mask by hand, and shared == unshared on a tiny Llama.

The reference is the module's unshared path (chosen and rejected stacked into one padded batch,
or packed); the shared path must give the same token log-probs at every response token, the same
DPO + T-REG loss and the same parameter gradients: to 1e-9 in float64, and in float32 within the
spread of the unshared path itself under another batch order and padding width.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from builders import tiny_llama
from treg_lightning.forward.batch import uses_shared_prompt
from treg_lightning.forward.shared_prompt import (
    CHOSEN,
    PAD,
    REJECTED,
    SHARED,
    prompt_lengths,
    shared_prompt_layout,
    shared_prompt_mask,
    shared_prompt_model_inputs,
    unpack_shared,
)
from treg_lightning.losses import DPOLoss, TokenRewardRegularizer
from treg_lightning.module import PreferenceModule

VOCAB = 64
SIDES = ("chosen", "rejected")
SRC = Path(__file__).resolve().parents[1] / "src"


def _side(prompts, responses, generator, dtype):
    """One side of the contract's batch (right padding): prompt + response ids, masks, rewards."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    batch_size, width = len(lengths), max(lengths)
    ids = torch.zeros(batch_size, width, dtype=torch.long)
    attention = torch.zeros(batch_size, width, dtype=torch.long)
    response = torch.zeros(batch_size, width, dtype=torch.bool)
    for b, (prompt, resp) in enumerate(zip(prompts, responses)):
        ids[b, : lengths[b]] = torch.tensor(prompt + resp)
        attention[b, : lengths[b]] = 1
        response[b, len(prompt) : lengths[b]] = True
    rewards = torch.rand(batch_size, width, generator=generator) - 0.5
    ref = -3 * torch.rand(batch_size, width, generator=generator, dtype=torch.float64)
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "response_mask": response,
        "token_rewards": torch.where(response, rewards, 0.0),
        "ref_token_logps": torch.where(response, ref, 0.0).to(dtype),
    }


def _batch(dtype=torch.float32, seed=0, prompt_lengths=(3, 1, 5, 8)):
    generator = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    prompts = [ids(n) for n in prompt_lengths]
    chosen = _side(prompts, [ids(n) for n in (4, 6, 2, 9)], generator, dtype)
    rejected = _side(prompts, [ids(n) for n in (2, 1, 7, 3)], generator, dtype)
    batch = {f"chosen_{k}": v for k, v in chosen.items()}
    batch |= {f"rejected_{k}": v for k, v in rejected.items()}
    batch["index"] = torch.tensor([10, 11, 12, 13])
    return batch


def _float64_rms_norm(self, hidden_states):
    """LlamaRMSNorm without its cast to float32, which it applies to float64 inputs too: in
    the backward that cast rounds each gradient to float32, so two exact orderings of the same
    sums (a prompt's gradient summed over both responses before or after a norm) would differ
    by float32 rounding (~1e-8), hiding the float64 comparison."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def exact_float64_norm(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", _float64_rms_norm)


def _tiny_llama(attn_implementation="sdpa", dtype=torch.float64):
    return tiny_llama(VOCAB, 0, dtype, attn_implementation=attn_implementation)


class TinyModule(PreferenceModule):
    """PreferenceModule whose load_model returns the tiny random Llama (no files)."""

    def __init__(self, attn_implementation="sdpa", dtype=torch.float64, **kwargs):
        super().__init__("tiny", loss=DPOLoss(beta=0.1),
                         regularizer=TokenRewardRegularizer(alpha=0.25), live_reference=False,
                         **kwargs)  # fmt: skip
        self.tiny = (attn_implementation, dtype)

    def load_model(self, name_or_path):
        return _tiny_llama(*self.tiny)


def _loss_logps_grads(module, batch):
    module.policy.zero_grad(set_to_none=True)
    loss, outputs = module.compute_loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters()}
    logps = {s: getattr(outputs["pair"], s).token_logps.detach() for s in SIDES}
    return loss.detach(), logps, grads


def _module(shared, packing=False, attn="sdpa", dtype=torch.float64):
    module = TinyModule(attn, dtype, shared_prompt=shared, packing=packing)
    module.configure_model()
    return module


def test_layout_by_hand():
    """Pair 0: prompt [5, 6], chosen [7], rejected [8, 9]; pair 1: prompt [4], chosen [1, 2],
    rejected [3]. Rows: [5 | 6 7 | 6' 8 9] and [4 1 2 | 4' 3]."""
    batch = {
        "chosen_input_ids": torch.tensor([[5, 6, 7], [4, 1, 2]]),
        "chosen_attention_mask": torch.tensor([[1, 1, 1], [1, 1, 1]]),
        "chosen_response_mask": torch.tensor([[0, 0, 1], [0, 1, 1]]).bool(),
        "rejected_input_ids": torch.tensor([[5, 6, 8, 9], [4, 3, 0, 0]]),
        "rejected_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "rejected_response_mask": torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]]).bool(),
    }
    rows = shared_prompt_layout(batch)
    assert rows["input_ids"].tolist() == [[5, 6, 7, 6, 8, 9], [4, 1, 2, 4, 3, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 1, 2, 3], [0, 1, 2, 0, 1, 0]]
    s, c, r, p = SHARED, CHOSEN, REJECTED, PAD
    assert rows["block"].tolist() == [[s, c, c, r, r, r], [c, c, c, r, r, p]]
    assert rows["response_mask"].long().tolist() == [[0, 0, 1, 0, 1, 1], [0, 1, 1, 0, 1, 0]]
    assert rows["pair_index"].tolist() == [[0] * 6, [1, 1, 1, 1, 1, -1]]
    packed = shared_prompt_layout(batch, packed=True)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 6, 8, 9, 4, 1, 2, 4, 3]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert packed["pair_index"].tolist() == [[0] * 6 + [1] * 5]
    # Pair 0 by hand: the rejected block (6', 8, 9) sees 5 and itself, never 6 or 7.
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # 5
            [1, 1, 0, 0, 0, 0],  # 6
            [1, 1, 1, 0, 0, 0],  # 7
            [1, 0, 0, 1, 0, 0],  # 6'
            [1, 0, 0, 1, 1, 0],  # 8
            [1, 0, 0, 1, 1, 1],  # 9
        ]
    ).bool()
    mask = shared_prompt_mask(rows)
    assert mask.shape == (2, 1, 6, 6)
    assert torch.equal(mask[0, 0], expected)
    # Pair 1: the padding column is seen by nobody else; the padding row sees itself only.
    assert not mask[1, 0, :5, 5].any() and mask[1, 0, 5].tolist() == [0, 0, 0, 0, 0, 1]
    assert torch.equal(shared_prompt_mask(packed)[0, 0, :6, :6], expected)
    assert not shared_prompt_mask(packed)[0, 0, 6:, :6].any()  # pairs stay apart
    additive = shared_prompt_mask(rows, torch.float64)[0, 0]
    blocked = torch.tensor(torch.finfo(torch.float64).min, dtype=torch.float64)
    torch.testing.assert_close(additive, torch.where(expected, 0.0, blocked))


@pytest.mark.parametrize("packed", [False, True])
def test_unpack_restores_the_side_layout(packed):
    batch = _batch()
    layout = shared_prompt_layout(batch, packed=packed)
    chosen, rejected = unpack_shared(layout["response_mask"], layout)
    assert torch.equal(chosen, batch["chosen_response_mask"])
    assert torch.equal(rejected, batch["rejected_response_mask"])
    chosen_ids, rejected_ids = unpack_shared(layout["input_ids"], layout)
    assert torch.equal(chosen_ids, batch["chosen_input_ids"])
    # The rejected rows get their own tokens from the last prompt token on (the shared prompt
    # tokens before it are held in the chosen rows only).
    keep = torch.arange(rejected_ids.shape[1])[None] >= prompt_lengths(batch)[:, None] - 1
    assert torch.equal(rejected_ids[keep], batch["rejected_input_ids"][keep])


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_equals_unshared_float64(packing, attn, exact_float64_norm):
    """Same token log-probs, DPO + T-REG loss and gradients as the unshared path."""
    batch = _batch(torch.float64)
    # transformers' eager attention runs its softmax in float32 even for float64 models.
    tolerance = 1e-9 if attn == "sdpa" else 1e-6
    want = _loss_logps_grads(_module(False, packing, attn), batch)
    got = _loss_logps_grads(_module(True, packing, attn), batch)
    for side in SIDES:
        mask = batch[f"{side}_response_mask"]
        assert got[1][side].shape == mask.shape
        assert (want[1][side][mask] < 0).all()  # real log-probs were compared, not zeros
        torch.testing.assert_close(got[1][side], want[1][side], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got[0], want[0], atol=tolerance, rtol=tolerance)
    for name, grad in want[2].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[2][name], grad, atol=tolerance, rtol=tolerance, msg=name)


def _reordered(batch, order, extra_padding):
    """The batch with its pairs in ``order`` and each side padded ``extra_padding`` wider."""
    out = {}
    for key, value in batch.items():
        value = value[order]
        if key != "index" and extra_padding:
            value = torch.nn.functional.pad(value, (0, extra_padding))
        out[key] = value
    return out


def test_shared_within_float32_noise_of_unshared():
    """float32: |shared - unshared| is no larger than the unshared path's own spread when the
    same pairs come in another order with wider padding, or than a few float32 ulps of the
    values (the spread is 0 on CPUs whose kernels do not depend on the batch layout)."""
    ulps = 16 * torch.finfo(torch.float32).eps
    batch = _batch(torch.float32)
    order = torch.tensor([2, 0, 3, 1])
    back = torch.argsort(order)
    unshared = _module(False, dtype=torch.float32)
    want = _loss_logps_grads(unshared, batch)
    other = _loss_logps_grads(unshared, _reordered(batch, order, extra_padding=3))
    got = _loss_logps_grads(_module(True, dtype=torch.float32), batch)
    for side in SIDES:
        width = batch[f"{side}_input_ids"].shape[1]
        floor = ulps * want[1][side].abs().max()
        noise = (other[1][side][back, :width] - want[1][side]).abs().max()
        error = (got[1][side] - want[1][side]).abs().max()
        assert noise < 1e-5 and floor < 1e-5  # the reference spread is small
        assert error <= max(4 * noise, floor), (side, error, noise, floor)
    grad_floor = ulps * max(g.abs().max() for g in want[2].values())
    grad_noise = max((other[2][n] - g).abs().max() for n, g in want[2].items())
    grad_error = max((got[2][n] - g).abs().max() for n, g in want[2].items())
    assert grad_error <= max(4 * grad_noise, grad_floor), (grad_error, grad_noise, grad_floor)
    loss_floor = ulps * abs(want[0])
    assert abs(got[0] - want[0]) <= max(4 * abs(other[0] - want[0]), loss_floor)


def test_prompt_lengths_field_is_used(exact_float64_norm):
    """A shorter ``prompt_lengths`` moves prompt tokens into both sides' blocks (computed
    twice, as unshared): same log-probs. A longer one would hide response tokens: error."""
    batch = _batch(torch.float64)
    first = prompt_lengths(batch)
    assert first.tolist() == [3, 1, 5, 8]
    module = _module(True)
    want = module.model_token_logps(module.policy, batch)
    batch["prompt_lengths"] = (first - 2).clamp(min=1)
    layout = shared_prompt_layout(batch)
    assert (layout["block"] == SHARED).sum(-1).tolist() == [0, 0, 2, 5]
    got = module.model_token_logps(module.policy, batch)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-9, rtol=1e-9)
    batch["prompt_lengths"] = first + 1
    with pytest.raises(ValueError, match=r"pairs \[10, 11, 12, 13\] score chosen tokens inside"):
        shared_prompt_layout(batch)


def test_different_prompts_are_refused():
    batch = _batch()
    batch["rejected_input_ids"][2, 1] = (batch["rejected_input_ids"][2, 1] + 1) % VOCAB
    with pytest.raises(ValueError, match=r"pairs \[12\] have different chosen and rejected"):
        shared_prompt_layout(batch)
    batch = _batch()
    batch["rejected_response_mask"][3, 8] = False  # rejected response starts one token later
    with pytest.raises(ValueError, match=r"pairs \[13\] have their first chosen and rejected"):
        shared_prompt_layout(batch)
    batch = _batch()
    batch["chosen_response_mask"][1, 0] = True  # response at position 0: empty prompt
    batch["rejected_response_mask"][1, 0] = True
    with pytest.raises(ValueError, match=r"pairs \[11\] have an empty prompt"):
        shared_prompt_layout(batch)
    batch = _batch()
    batch["chosen_attention_mask"] = batch["chosen_attention_mask"].flip(-1)  # left padding
    with pytest.raises(ValueError, match="not right-padded"):
        shared_prompt_layout(batch)


def test_auto_setting_and_flash_refusal():
    model = _tiny_llama()
    assert uses_shared_prompt(model, None, _batch())  # sdpa: measured faster (bench/README.md)
    assert not uses_shared_prompt(model, False, _batch())
    different = _batch()
    different["rejected_input_ids"][0, 0] = (different["rejected_input_ids"][0, 0] + 1) % VOCAB
    # Auto computes a batch without shared prompts unshared (same values) and says so.
    with pytest.warns(UserWarning, match=r"unshared: .*pairs \[10\] have different"):
        assert not uses_shared_prompt(model, None, different)
    assert uses_shared_prompt(model, True, different)  # explicit: the layout raises
    model.config._attn_implementation = "flash_attention_2"
    assert not uses_shared_prompt(model, None) and uses_shared_prompt(model, True)
    layout = shared_prompt_layout(_batch())
    with pytest.raises(ValueError, match="flash_attention_2.*flex_attention or sdpa"):
        shared_prompt_model_inputs(layout, "flash_attention_2")


# Run as `python train.py model_dir data_file out_dir` with the checkout's src on PYTHONPATH.
# Lightning's launcher re-runs it as rank 1; both ranks fit twice (shared, then unshared) from
# the same seed, so the test process never joins a process group and pays one launch.
FSDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    import treg_lightning.module.preference as module_code
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.losses import DPOLoss, TokenRewardRegularizer
    from treg_lightning.module import PreferenceModule
    from treg_lightning.rewards import ContrastiveRewards

    model_dir, data_file, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    calls = []
    shared_forward = module_code.shared_prompt_token_logps

    def counted(*args, **kwargs):
        calls.append(1)
        return shared_forward(*args, **kwargs)

    module_code.shared_prompt_token_logps = counted

    class Record(L.Callback):
        def __init__(self):
            self.losses, self.grad_norms = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)  # of the sharded (DTensor) gradients
            self.grad_norms.append(float(norm.full_tensor()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(trainer.callback_metrics["train/loss_step"]))

    results = {}
    for shared in (True, False):
        L.seed_everything(0)
        module = PreferenceModule(
            model_dir, loss=DPOLoss(beta=0.5), regularizer=TokenRewardRegularizer(alpha=0.5),
            shared_prompt=shared, gradient_checkpointing=True,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0),
        )
        data = PreferenceDataModule(
            data_file, tokenizer=model_dir, max_length=64, max_prompt_length=32, batch_size=2,
            rewards=ContrastiveRewards(cache_dir=str(out_dir / "cache")),
        )
        record = Record()
        trainer = L.Trainer(
            accelerator="cpu", devices=2, max_steps=3, logger=False,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
            limit_val_batches=0, enable_checkpointing=False, gradient_clip_val=1.0,
            callbacks=[record],
        )
        trainer.fit(module, datamodule=data)
        results[str(shared)] = {
            "losses": record.losses, "grad_norms": record.grad_norms, "shared_calls": len(calls)
        }
        calls.clear()
    if trainer.is_global_zero:
        (out_dir / "results.json").write_text(json.dumps(results))
    """
)


def test_fsdp2_two_processes_shared_equals_unshared(tiny_model_dir, tmp_path):
    """FSDP2 (ModelParallelStrategy, 2 CPU processes, gloo), DPO + T-REG, 3 steps: the same
    losses and global gradient norms with and without the shared prompt (steps 2 and 3 also
    depend on the sharded gradients of the steps before)."""
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as f:
        for i in range(8):
            row = {
                "prompt": f"What is {i} + {i}? Answer in a few words.",
                "chosen": f"It is {2 * i}.",
                "rejected": f"It is {2 * i + 1}, I think." + " really" * i,
            }
            f.write(json.dumps(row) + "\n")
    script = tmp_path / "train.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, str(script), str(tiny_model_dir), str(data), str(tmp_path)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launched rank too
        _, stderr = process.communicate()
        pytest.fail(f"FSDP2 run hung:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    shared, unshared = results["True"], results["False"]
    assert shared["shared_calls"] == 3 and unshared["shared_calls"] == 0  # one per policy step
    assert shared["losses"][0] != pytest.approx(shared["losses"][2], abs=1e-3)  # it trained
    for key in ("losses", "grad_norms"):
        assert len(shared[key]) == 3
        torch.testing.assert_close(
            torch.tensor(shared[key]), torch.tensor(unshared[key]), atol=1e-5, rtol=1e-5
        )
