"""`treg plan`'s estimate against the measured peak of real PreferenceModule training steps.

Each case runs in a fresh subprocess: a randomly initialised Llama-shaped model saved to a
temporary folder, loaded by ``PreferenceModule.configure_model()`` (float32, sdpa, CPU), then
one optimizer step of two accumulated micro-batches (the plan's worst case: the gradients of
the first micro-batch are held while the second runs; the optimizer states are created before,
by a step with zero gradients). Every sequence has ``max_length`` tokens, one prompt token, one
padded position (so sdpa gets a mask, as with real padded batches). T-REG token rewards are
random.

The estimate comes from the same code path as ``treg plan``: a config dict (trainer / model /
data sections) through ``treg_lightning.plan.plan_from_config``.

Two measures of the peak:

- *tensor bytes*: ``torch.distributed._tools.mem_tracker.MemTracker``, a ``TorchDispatchMode``
  that sees every tensor storage created by an op and when it is freed, plus the weights and
  optimizer states registered with ``track_external``: the live tensor bytes at the worst
  moment, i.e. what ``torch.cuda.max_memory_allocated()`` reports on a GPU, without the CPU
  allocator's caching. This is the figure the estimate is checked against. A dispatch mode
  cannot see temporaries allocated inside one op; the one that matters here, the
  ``[chunk, vocab]`` buffer inside ``torch.logsumexp``, is made visible by running the same
  ops separately (``_logsumexp_through_dispatch``).
- *RSS*: the resident-set high-water mark (``VmHWM``, reset after the model load through
  ``/proc/self/clear_refs``) minus the resident set before the model load, with glibc told to
  return large blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``). It includes what the
  interpreter, autograd's graph and the allocators add, so it reads higher.

    python bench/plan_vs_measured.py                       # 20 cases, ~17 min on 2 busy cores
    python bench/plan_vs_measured.py --dry-run             # one tiny case, ~25 s
    python bench/plan_vs_measured.py --out bench/results/plan_vs_measured.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "tiny": (64, 160, 2, 4, 2, 1000),
    "small": (256, 704, 4, 8, 2, 32000),
}
VARIANTS = {
    # name: (loss class, live reference, gradient checkpointing)
    "simpo": ("treg_lightning.losses.SimPOLoss", False, False),
    "simpo+ckpt": ("treg_lightning.losses.SimPOLoss", False, True),
    "dpo-live": ("treg_lightning.losses.DPOLoss", True, False),
    "dpo-cached": ("treg_lightning.losses.DPOLoss", False, False),
}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_model(name: str, folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, vocab = MODELS[name]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def plan_config(folder: Path, variant: str, length: int, batch: int) -> dict:
    loss, live, checkpointing = VARIANTS[variant]
    return {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "accumulate_grad_batches": 2,
        },
        "model": {
            "model": str(folder),
            "loss": {"class_path": loss},
            "live_reference": live,
            "torch_dtype": "float32",
            "attn_implementation": "sdpa",
            "gradient_checkpointing": checkpointing,
            "logp_chunk_size": 256,
            "optimizer": {"class_path": "torch.optim.AdamW"},
        },
        "data": {"max_length": length, "batch_size": batch, "rewards": "none"},
    }


def make_batch(vocab: int, length: int, batch: int, cached: bool) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    out = {}
    for side in ("chosen", "rejected"):
        out[f"{side}_input_ids"] = torch.randint(1, vocab, (batch, length), generator=generator)
        out[f"{side}_attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        mask[:, 1:] = True
        out[f"{side}_response_mask"] = mask
        out[f"{side}_token_rewards"] = torch.rand(batch, length, generator=generator) - 0.5
        if cached:
            out[f"{side}_ref_token_logps"] = -torch.rand(batch, length, generator=generator)
    # One padded position: sdpa then gets a mask, as with real padded batches.
    out["rejected_attention_mask"][-1, -1] = 0
    out["rejected_response_mask"][-1, -1] = False
    out["index"] = torch.arange(batch)
    return out


def _tracker():
    """A MemTracker that also follows frozen weights (the reference, a LoRA base): the stock
    one registers a gradient hook on every parameter, which fails on frozen ones."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            frozen = [p for p in module.parameters() if not p.requires_grad]
            for param in frozen:  # count them, then let the stock code skip the hook
                self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                self._param_to_grad_hook_handles.setdefault(param, ())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _deregister_param_and_optimizer_hooks(self) -> None:
            for param, handles in list(self._param_to_grad_hook_handles.items()):
                if not handles:
                    del self._param_to_grad_hook_handles[param]
            super()._deregister_param_and_optimizer_hooks()

    return Tracker()


def _logsumexp_through_dispatch(x, dim=-1):
    """torch.logsumexp with its ``[rows, vocab]`` temporary allocated by separate ops, so that
    the tracker sees it (ATen's kernel makes the same one, ``(x - max).exp_()``, inside the
    op, where a dispatch mode cannot see it)."""
    top = x.amax(dim, keepdim=True)
    return (x - top).exp_().sum(dim).log_() + top.squeeze(dim)


def worker(args) -> dict:
    """One case: load, create the optimizer states, train one tracked step of 2 micro-batches;
    report both peaks and the estimate."""
    import torch

    from treg_lightning.losses import DPOLoss, SimPOLoss, TokenRewardRegularizer
    from treg_lightning.module import PreferenceModule
    from treg_lightning.plan import plan_from_config

    torch.set_num_threads(args.threads)
    torch.logsumexp = _logsumexp_through_dispatch
    folder = Path(args.folder)
    config = plan_config(folder, args.variant, args.length, args.batch)
    plan = plan_from_config(config, gpu_memory="1TB", reserve="0GB")
    loss_name, live, checkpointing = VARIANTS[args.variant]
    loss = DPOLoss(beta=0.1) if "DPO" in loss_name else SimPOLoss(beta=2.0)
    module = PreferenceModule(
        str(folder),
        loss=loss,
        regularizer=TokenRewardRegularizer(alpha=0.25),
        live_reference=live,
        attn_implementation="sdpa",
        gradient_checkpointing=checkpointing,
        logp_chunk_size=256,
    )
    vocab = MODELS[args.model][-1]
    batch = make_batch(vocab, args.length, args.batch, cached="cached" in args.variant)
    rss_before = _rss_kib("VmRSS")
    module.configure_model()
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad])
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (after the load)

    def step(tracker=None):
        for _ in range(2):  # two accumulated micro-batches
            total, _ = module.compute_loss(batch, "train")
            (total / 2).backward()
            if tracker is not None:
                tracker.reset_mod_stats()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    # AdamW creates its states at the first step: take one with zero gradients (no update
    # beyond weight decay), so that the tracked step runs with the states in place.
    for param in module.policy.parameters():
        param.grad = torch.zeros_like(param) if param.requires_grad else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker = _tracker()
    tracker.track_external(*(m for m in (module.policy, module.reference) if m is not None))
    tracker.track_external(optimizer)
    with tracker:
        step(tracker)
    seconds = time.perf_counter() - start
    peak = tracker.get_tracker_snapshot("peak")
    tensor_peak = max(snap["Total"] for snap in peak.values())
    rss_peak = (_rss_kib("VmHWM") - rss_before) * 1024
    estimated = plan.estimate.peak
    return {
        "model": args.model,
        "params": plan.estimate.shape.num_params(),
        "variant": args.variant,
        "max_length": args.length,
        "micro_batch": args.batch,
        "estimated_mib": estimated / 2**20,
        "measured_tensor_mib": tensor_peak / 2**20,
        "measured_rss_mib": rss_peak / 2**20,
        "error_pct": 100 * (estimated - tensor_peak) / tensor_peak,
        "error_vs_rss_pct": 100 * (estimated - rss_peak) / rss_peak,
        "parts_mib": {p.name: p.bytes / 2**20 for p in plan.estimate.parts},
        "measured_by_kind_mib": {
            str(kind): value / 2**20
            for snap in peak.values()
            for kind, value in snap.items()
            if kind != "Total"
        },
        "seconds": seconds,
    }


def cases(dry_run: bool):
    if dry_run:
        return [("tiny", "simpo", 64, 2)]
    out = []
    for model, lengths, batch in (("tiny", (64, 128, 256), 2), ("small", (128, 512), 2)):
        for variant in VARIANTS:
            for length in lengths:
                out.append((model, variant, length, batch))
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="one tiny case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    for name in ("model", "variant", "folder"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("length", "batch"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for model, variant, length, batch in cases(args.dry_run):
            if model not in folders:
                folders[model] = Path(tmp) / model
                build_model(model, folders[model])
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--model",
                model,
                "--variant",
                variant,
                "--length",
                str(length),
                "--batch",
                str(batch),
                "--folder",
                str(folders[model]),
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{model} {variant} {length} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(row)
            print(
                f"{model:<6}{variant:<12}{length:>5}  estimated {row['estimated_mib']:8.1f} "
                f"MiB  tensors {row['measured_tensor_mib']:8.1f} ({row['error_pct']:+5.1f} %)  "
                f"RSS {row['measured_rss_mib']:8.1f} ({row['error_vs_rss_pct']:+5.1f} %)",
                flush=True,
            )
    errors = [abs(r["error_pct"]) for r in results]
    print(
        f"|error| vs tensor peak: max {max(errors):.1f} %, mean {sum(errors) / len(errors):.1f} %"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
