"""Peak memory of chunked token log-probs vs the naive ``log_softmax(hidden @ W.T)``, forward +
backward.

Each variant runs in a fresh subprocess, so one variant's allocator state cannot hide another's
peak. On CUDA the peak is ``torch.cuda.max_memory_allocated()`` above what the inputs already
hold; on CPU it is the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` once the inputs exist) above the resident set at that moment, falling
back to ``ru_maxrss`` where ``/proc`` is unavailable.

    python bench/logprobs_memory.py                          # CPU-sized defaults
    python bench/logprobs_memory.py --batch 8 --seq 1024 --hidden 2048 --vocab 128256 \\
        --dtype bfloat16 --device cuda --out results.json    # Llama-3-8B-sized head
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("naive", "chunked")


def _rss_kib(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in KiB, or None without ``/proc``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def _naive(hidden, weight, input_ids, mask, chunk_size):
    import torch

    logits = (hidden[:, :-1] @ weight.T).float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.where(mask[:, 1:], logps, 0.0)


def _chunked(hidden, weight, input_ids, mask, chunk_size):
    from treg_lightning.forward.logprobs import token_logps_from_hidden

    return token_logps_from_hidden(hidden, weight, input_ids, mask, chunk_size=chunk_size)


def run_variant(args) -> dict:
    """Build the inputs, then measure one forward + backward of ``args.worker``."""
    import torch

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    hidden = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype)
    hidden.requires_grad_(True)
    weight = (
        torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) * 0.02
    ).requires_grad_()
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool, device=device)
    mask[:, : int(args.seq * args.prompt_fraction)] = False  # prompt tokens are not scored
    # Gradient buffers exist in a training step before the loss is computed; allocate them now
    # so that the measured peak is the log-prob computation only.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    fn = {"naive": _naive, "chunked": _chunked}[args.worker]
    # Warm up on a few tokens so that imports and first-call kernel setup are not measured.
    warm_hidden = hidden[:1, :8].detach().requires_grad_(True)
    fn(warm_hidden, weight, input_ids[:1, :8], mask[:1, :8], args.chunk_size).sum().backward()
    hidden.grad.zero_()
    weight.grad.zero_()

    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated"
    else:
        baseline_kib = _rss_kib("VmRSS")
        exact = baseline_kib is not None and _reset_peak_rss()
        if not exact:
            baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "VmHWM (clear_refs)" if exact else "ru_maxrss (upper bound)"

    start = time.perf_counter()
    token_logps = fn(hidden, weight, input_ids, mask, args.chunk_size)
    token_logps.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated() - baseline
    else:
        peak_kib = (
            _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        peak_bytes = (peak_kib - baseline_kib) * 1024
    return {
        "variant": args.worker,
        "peak_mib": peak_bytes / 2**20,
        "seconds": seconds,
        "method": method,
        "scored_tokens": int(mask[:, 1:].sum()),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument(
        "--prompt-fraction",
        type=float,
        default=0.0,
        help="leading share of each row treated as prompt (not scored); naive scores it anyway",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:  # child process: one variant, one JSON line on stdout
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args)))
        return

    options = (
        "batch",
        "seq",
        "hidden",
        "vocab",
        "dtype",
        "device",
        "chunk_size",
        "prompt_fraction",
        "threads",
    )
    passthrough = []
    for name in options:
        passthrough += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, *passthrough, "--worker", variant]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    config = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    print(
        f"batch {args.batch} x seq {args.seq}, hidden {args.hidden}, vocab {args.vocab}, "
        f"{args.dtype} on {args.device}, chunk_size {args.chunk_size}; "
        f"peak by {results[0]['method']}, forward + backward"
    )
    print(f"{'variant':<10}{'peak MiB':>12}{'seconds':>10}")
    for row in results:
        print(f"{row['variant']:<10}{row['peak_mib']:>12.0f}{row['seconds']:>10.2f}")
    naive, chunked = results
    print(f"chunked / naive peak: {chunked['peak_mib'] / naive['peak_mib']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
