"""CUDA checks (``gpu`` marker; bench/gpu_check.sh runs them first on a GPU machine).

Skipped without CUDA, except under ``TREG_GPU_DRY_RUN=1`` (``bench/gpu_check.sh --dry-run``),
which runs every test on CPU with tiny shapes, so that a first GPU run cannot die on a typo.

- bf16 chunked log-probs against a float32 reference, at a 128k vocabulary on CUDA;
- packing equals padded (sdpa; each varlen kernel, flash-attn's and torch's own, skipped with
  the reason where it cannot run; their stand-ins on the dry run);
- the shared prompt equals the unshared path (sdpa rows and packed, and flex_attention, the GPU
  route for the shared layout);
- a few bf16 FSDP2 steps (ModelParallelStrategy, one device) of Llama-3.2-1B's shape.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import MethodType

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from treg_lightning.forward.logprobs import token_logps_from_hidden
from treg_lightning.forward.packing import pack_batch, packed_model_inputs, unpack_pairs
from treg_lightning.models.loading import flash_attn_available
from treg_lightning.models.varlen_attention import TORCH_VARLEN, torch_varlen_available

CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get("TREG_GPU_DRY_RUN") == "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")
SRC = Path(__file__).resolve().parents[1] / "src"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (CUDA or DRY_RUN),
        reason="needs a CUDA device (TREG_GPU_DRY_RUN=1 runs these on CPU with tiny shapes)",
    ),
]
# Real shapes on CUDA; tiny ones for the CPU dry run.
BIG = CUDA and not DRY_RUN
MODEL = {
    "hidden_size": 256 if BIG else 32,
    "intermediate_size": 704 if BIG else 64,
    "num_hidden_layers": 4 if BIG else 2,
    "num_attention_heads": 8 if BIG else 4,
    "num_key_value_heads": 2,
    "vocab_size": 32000 if BIG else 64,
}
SIDES = ("chosen", "rejected")


def _batch(seed=0, prompts=(60, 7, 130, 21), chosen=(40, 90, 12, 5), rejected=(33, 2, 70, 64)):
    """A contract batch on DEVICE with shared prompts (right padding, random ids)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = MODEL["vocab_size"]
    prompt_ids = [torch.randint(3, vocab, (n,), generator=generator) for n in prompts]
    batch = {"index": torch.arange(len(prompts))}
    for side, lengths in (("chosen", chosen), ("rejected", rejected)):
        total = [p + r for p, r in zip(prompts, lengths)]
        ids = torch.zeros(len(total), max(total), dtype=torch.long)
        attention = torch.zeros_like(ids)
        response = torch.zeros_like(ids, dtype=torch.bool)
        for b, (p, n) in enumerate(zip(prompts, total)):
            ids[b, :p] = prompt_ids[b]
            ids[b, p:n] = torch.randint(3, vocab, (n - p,), generator=generator)
            attention[b, :n] = 1
            response[b, p:n] = True
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": attention}
        batch[f"{side}_response_mask"] = response
        batch[f"{side}_token_rewards"] = torch.where(response, 0.1, 0.0)
    return {k: v.to(DEVICE) for k, v in batch.items()}


def _model(attn="sdpa", dtype=torch.float32):
    config = LlamaConfig(**MODEL, max_position_embeddings=2048, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype)


def _naive_logps(hidden, weight, ids, mask):
    logits = (hidden @ weight.T).float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    out = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device)
    out[:, 1:] = torch.where(mask[:, 1:], logps, 0.0)
    return out


def test_bf16_chunked_logps_against_float32():
    """bf16 hidden states and lm_head (128k vocabulary on CUDA): values within bf16 rounding of
    the logits of a float32 reference, gradients within 2 % of its largest entry."""
    batch, seq, hidden_size, vocab = (2, 512, 2048, 128256) if BIG else (2, 16, 16, 64)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_size, generator=generator).to(DEVICE)
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(DEVICE)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(DEVICE)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=DEVICE)
    mask[:, : seq // 4] = False
    upstream = torch.randn(batch, seq, generator=generator).to(DEVICE)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (hidden, weight)]
        out = fn(leaves[0], leaves[1], ids, mask)
        grads = torch.autograd.grad((out * upstream).sum(), leaves)
        return out.detach(), grads

    def chunked(h, w, i, m):
        return token_logps_from_hidden(h, w, i, m, chunk_size=256)

    ours, our_grads = run(chunked, torch.bfloat16)
    want, want_grads = run(_naive_logps, torch.float32)
    assert ours.dtype == torch.float32
    error = (ours - want)[mask].abs()
    assert error.max() < 0.1 and error.mean() < 0.02, (error.max(), error.mean())
    for got, expected in zip(our_grads, want_grads, strict=True):
        assert got.dtype == torch.bfloat16
        scale = expected.abs().max()
        assert ((got.float() - expected) / scale).abs().max() < 0.02


def _loss(out, batch):
    """A loss that weighs every response token differently (so gradients differ per token)."""
    total = 0
    for side, sign in zip(SIDES, (1.0, -0.7)):
        weights = batch[f"{side}_token_rewards"] + 0.05 * torch.arange(
            out[side].shape[1], device=DEVICE
        )
        total = total + sign * (out[side] * weights).sum()
    return total / batch["chosen_input_ids"].shape[0]


def _padded(model, batch):
    out = {}
    for side in SIDES:
        ids = batch[f"{side}_input_ids"]
        hidden = model.model(input_ids=ids, attention_mask=batch[f"{side}_attention_mask"])[0]
        mask = batch[f"{side}_response_mask"]
        out[side] = token_logps_from_hidden(hidden, model.lm_head.weight, ids, mask)
    return out


def _packed(model, batch):
    packed = pack_batch(batch)
    inputs = packed_model_inputs(packed, model.config._attn_implementation, model.dtype)
    hidden = model.model(**inputs)[0]
    logps = token_logps_from_hidden(
        hidden, model.lm_head.weight, packed["input_ids"], packed["response_mask"]
    )
    return dict(zip(SIDES, unpack_pairs(logps, packed)))


def _values_and_grads(fn, model, batch):
    model.zero_grad(set_to_none=True)
    out = fn(model, batch)
    _loss(out, batch).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    return {k: v.detach().float() for k, v in out.items()}, grads


def _assert_close(got, want, batch, atol, grad_tol):
    for side in SIDES:
        mask = batch[f"{side}_response_mask"]
        assert (want[0][side][mask] < 0).all()
        torch.testing.assert_close(got[0][side], want[0][side], atol=atol, rtol=atol)
    for name, grad in want[1].items():
        scale = grad.abs().max()
        assert scale > 0, name
        assert ((got[1][name] - grad) / scale).abs().max() < grad_tol, name


def test_packing_equals_padded():
    """float32 sdpa: packed rows with the block-diagonal mask, exact up to kernel rounding."""
    batch = _batch()
    model = _model("sdpa")
    want = _values_and_grads(_padded, model, batch)
    _assert_close(_values_and_grads(_packed, model, batch), want, batch, 2e-4, 2e-3)


# The varlen kernels packing runs on a GPU, and why one may not run there. On the CPU dry run
# their stand-ins run instead (the emulations: tests/forward/test_flash_emulation.py and
# tests/forward/test_torch_varlen.py), so the test's own code runs before the first GPU call.
VARLEN_KERNELS = {
    "flash_attention_2": (flash_attn_available, "flash-attn is not installed"),
    TORCH_VARLEN: (torch_varlen_available, "torch's varlen_attn needs an Ampere or newer GPU"),
}


@contextlib.contextmanager
def _varlen_model(kernel, monkeypatch):
    """A bf16 model on ``kernel``: the real one on CUDA, the stand-in on the CPU dry run."""
    if CUDA:
        yield _model(kernel, torch.bfloat16)
        return
    from torch.nn.attention import varlen

    from stand_in_kernels import kept_flash_cache, stand_in_flash_attn
    from stand_in_kernels import varlen_attn as stand_in_varlen

    monkeypatch.setattr(varlen, "varlen_attn", stand_in_varlen)
    with kept_flash_cache(), stand_in_flash_attn(monkeypatch):
        model = _model("sdpa", torch.bfloat16)
        model.config._attn_implementation = kernel  # transformers would look for the wheel
        yield model


@pytest.mark.parametrize("kernel", sorted(VARLEN_KERNELS))
def test_packing_through_a_varlen_kernel(kernel, monkeypatch):
    """bf16 packed rows through the kernel: log-probs within twice the bf16 padded sdpa path's
    own distance from float32, gradients likewise (relative to their largest entry)."""
    available, reason = VARLEN_KERNELS[kernel]
    if CUDA and not available():
        pytest.skip(f"{kernel}: {reason}")
    batch = _batch()
    want = _values_and_grads(_padded, _model("sdpa"), batch)
    bf16_padded = _values_and_grads(_padded, _model("sdpa", torch.bfloat16), batch)
    with _varlen_model(kernel, monkeypatch) as model:
        packed = _values_and_grads(_packed, model, batch)
    for side in SIDES:
        mask = batch[f"{side}_response_mask"]
        noise = (bf16_padded[0][side] - want[0][side])[mask].abs().max()
        error = (packed[0][side] - want[0][side])[mask].abs().max()
        assert error <= 2 * noise + 1e-3, (side, error, noise)
    for name, grad in want[1].items():
        scale = grad.abs().max()
        noise = (bf16_padded[1][name] - grad).abs().max() / scale
        error = (packed[1][name] - grad).abs().max() / scale
        assert error <= 2 * noise + 1e-3, (name, error, noise)


def _token_logps(lm, model_inputs, score_mask, chunk_size, softcap):
    """What PreferenceModule binds as ``lm.token_logps``: base model, then chunked log-probs."""
    hidden = lm.model(**model_inputs)[0]
    return token_logps_from_hidden(
        hidden, lm.lm_head.weight, model_inputs["input_ids"], score_mask, chunk_size, softcap
    )


def _shared(packed):
    def run(model, batch):
        from treg_lightning.forward.batch import shared_prompt_token_logps

        model.token_logps = MethodType(_token_logps, model)
        out = shared_prompt_token_logps(model, batch, 1024, None, packed=packed)
        return {side: out[side] for side in SIDES}

    return run


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_shared_prompt_equals_unshared(packed):
    """float32: sdpa with the dense shared mask equals the unshared padded path."""
    batch = _batch()
    model = _model("sdpa")
    want = _values_and_grads(_padded, model, batch)
    _assert_close(_values_and_grads(_shared(packed), model, batch), want, batch, 2e-4, 2e-3)


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_shared_prompt_flex_equals_unshared(packed):
    """float32, CUDA: flex_attention with the BlockMask (the shared layout's GPU route;
    transformers compiles the flex kernel, slow the first time, so the GPU check runs the tests
    named "flex" last, when time remains) equals the unshared padded path. On CPU torch 2.13's
    flex compile fails and flex has no backward: tests/forward/test_flex_emulation.py checks the
    mask and the forward there."""
    if not CUDA:
        pytest.skip("flex_attention's compiled kernel and its backward need a CUDA device")
    batch = _batch()
    want = _values_and_grads(_padded, _model("sdpa"), batch)
    flex = _model("flex_attention")
    _assert_close(_values_and_grads(_shared(packed), flex, batch), want, batch, 1e-3, 5e-3)


FSDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, time

    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from transformers import LlamaConfig, LlamaForCausalLM

    from treg_lightning.losses import SimPOLoss, TokenRewardRegularizer
    from treg_lightning.module import PreferenceModule

    shape, out_path, steps, accumulate = json.loads(sys.argv[1]), sys.argv[2], 3, 2
    cuda = torch.cuda.is_available()

    class RandomLlama(PreferenceModule):
        def load_model(self, name_or_path):
            config = LlamaConfig(**shape["model"], tie_word_embeddings=True)
            with torch.device("cuda" if cuda else "cpu"):  # float32 masters, as shipped
                return LlamaForCausalLM._from_config(config, dtype=torch.float32)

    def full(tensor):
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    def local_dtype(tensor):
        return str((tensor.to_local() if hasattr(tensor, "to_local") else tensor).dtype)

    class Record(L.Callback):
        # Watches layer 0's q_proj: its dtypes in the forward, and the first AdamW step.
        losses, stamps, seen, dtypes = [], [], set(), {}

        def on_train_start(self, trainer, pl_module):
            policy = pl_module.policy
            layer = policy.model.layers[0]
            self.q_proj = getattr(layer, "_checkpoint_wrapped_module", layer).self_attn.q_proj
            self.q_proj.register_forward_pre_hook(
                lambda m, args: self.seen.add((str(args[0].dtype), str(m.weight.dtype)))
            )
            self.before = full(self.q_proj.weight).detach().double().cpu()
            self.dtypes["sharded"] = sorted({local_dtype(p) for p in policy.parameters()})

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                self.grad = full(self.q_proj.weight.grad).detach().double().cpu()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            if cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            if trainer.global_step == 1 and not hasattr(self, "after"):
                self.after = full(self.q_proj.weight).detach().double().cpu()

        def on_train_end(self, trainer, pl_module):
            states = trainer.optimizers[0].state.values()
            self.dtypes["optimizer"] = sorted(
                {local_dtype(v) for s in states for k, v in s.items() if k != "step"}
            )
            self.dtypes["forward"] = sorted(self.seen)

    generator = torch.Generator().manual_seed(0)
    batch, prompt, response = shape["batch"], shape["prompt"], shape["response"]
    vocab = shape["model"]["vocab_size"]
    prompt_ids = torch.randint(3, vocab, (batch, prompt), generator=generator)
    data = {"index": torch.arange(batch)}
    for side in ("chosen", "rejected"):
        ids = torch.randint(3, vocab, (batch, prompt + response), generator=generator)
        ids[:, :prompt] = prompt_ids
        data[f"{side}_input_ids"] = ids
        data[f"{side}_attention_mask"] = torch.ones_like(ids)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, prompt:] = True
        data[f"{side}_response_mask"] = mask
        data[f"{side}_token_rewards"] = torch.where(mask, 0.2, 0.0)
    loader = torch.utils.data.DataLoader([data] * steps * accumulate, batch_size=None)
    module = RandomLlama(
        "random-llama", loss=SimPOLoss(beta=2.0), regularizer=TokenRewardRegularizer(alpha=0.25),
        torch_dtype="float32", fsdp_param_dtype="bfloat16", gradient_checkpointing=True,
        scheduler=None,
        optimizer=lambda params: torch.optim.AdamW(params, lr=shape["lr"], weight_decay=0.0),
    )
    record = Record()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_steps=steps, logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        accumulate_grad_batches=accumulate, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        callbacks=[record],
    )
    trainer.fit(module, train_dataloaders=loader)
    stamps = record.stamps[::accumulate]  # one per optimizer step
    lr, w0, w1, g = shape["lr"], record.before, record.after, record.grad
    expected = w0 - lr * g / (g.abs() + 1e-8)  # AdamW's first step, bias-corrected
    ulp = torch.finfo(torch.float32).eps * w0.abs()
    result = {"losses": record.losses, "step_s": [b - a for a, b in zip(stamps, stamps[1:])],
              "tokens_per_step": 2 * batch * (prompt + response) * accumulate,
              "params": sum(p.numel() for p in module.policy.parameters()),
              "sharded": type(module.policy).__name__, "dtypes": record.dtypes,
              "update_error_over_lr": float(((w1 - expected).abs() - ulp).max() / lr),
              "moved": float(((w1 - w0).abs() > 0.99 * lr)[g.abs() > 1e-6].float().mean()),
              "below_bf16": float((w1.bfloat16() == w0.bfloat16()).float().mean())}
    if cuda:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        result["device"] = torch.cuda.get_device_name()
    open(out_path, "w").write(json.dumps(result))
    """
)
ONE_B = {
    "model": {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rope_theta": 500000.0, "max_position_embeddings": 8192,
    },
    "batch": 4, "prompt": 256, "response": 256, "lr": 1e-5,
}  # fmt: skip
TINY = {"model": {**MODEL, "max_position_embeddings": 256}, "batch": 2, "prompt": 8,
        "response": 8, "lr": 1e-5}  # fmt: skip


def test_fsdp2_bf16_steps_of_the_1b_shape(tmp_path):
    """Three optimizer steps of 2 accumulated micro-batches, Llama-3.2-1B's shape (random
    weights, SimPO + T-REG, checkpointing, the shared prompt) under FSDP2 on one device with
    the shipped precision: float32 masters and AdamW states, bfloat16 compute. The first AdamW
    step lands in the float32 masters as lr * g / (|g| + eps) although it is below bfloat16's
    resolution for most weights (so this does not pass by luck, as "the loss falls" could).
    Prints step time and peak memory."""
    shape = ONE_B if BIG else TINY
    out = tmp_path / "fsdp.json"
    script = tmp_path / "fsdp_steps.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, str(script), json.dumps(shape), str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    print(f"FSDP2 bf16 steps: {result}")
    assert len(result["losses"]) == 6 and all(map(math.isfinite, result["losses"]))
    assert result["dtypes"] == {
        "sharded": ["torch.float32"],
        "optimizer": ["torch.float32"],
        "forward": [["torch.bfloat16", "torch.bfloat16"]],
    }
    assert result["update_error_over_lr"] < 1e-3 and result["moved"] == 1.0
    assert result["below_bf16"] > 0.5
