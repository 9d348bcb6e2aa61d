"""Train the same model on the same preference pairs with treg-lightning and with TRL's DPOTrainer.

Both sides train one randomly initialised Llama-shaped model, saved once to a temporary folder,
on the same pairs, with the same micro-batch, AdamW with the same learning rate and no weight
decay, gradient-norm clipping at 1.0 (TRL's default, done on our side too). Pair lengths come
from ``bench/data/hh_lengths.json`` (HH-RLHF, see ``derive_hh_lengths.py``), the same file on
every machine. Each side runs in its own process (its peak memory is its own), loads the model
once and loops over its workloads (max length, micro-batch): warm-up steps, then a timed window
of at least ``--window-s`` seconds cycling a pool of ``--pool-steps`` micro-batches and ending on
whole passes over it, so every side times the same pairs (``vs_trl_runners.py``).

- **ours**: :class:`treg_lightning.module.PreferenceModule` (``compute_loss``, the module's own
  code path: one policy forward over chosen + rejected, chunked token log-probs,
  :class:`~treg_lightning.losses.DPOLoss` + :class:`~treg_lightning.losses.TokenRewardRegularizer`
  with ``alpha`` = 0.25 and token rewards uniform in (-0.5, 0.5) standing in for the cached
  ``r_hat``). Reference token log-probs are computed once before timing, as the annotate pass
  does, and served from the batch (no reference model in memory). Batches in the order of
  :class:`~treg_lightning.data.collate.LengthGroupedSampler`. With flash-attn installed (CUDA),
  the module packs chosen and rejected padding-free; otherwise each pair's prompt is computed
  once (``shared_prompt`` auto: one padded row ``[prompt, chosen, rejected]`` per pair, sdpa).
- **ours-unshared**: the same with ``shared_prompt=False``: the shared prompt's gain.
- **trl**: ``trl.DPOTrainer`` with ``loss_type="sigmoid"``, a live reference model, its default
  gradient checkpointing, pairs in the given (random) order; the only override feeds it the same
  token ids (``_prepare_dataset`` returns the pre-tokenized rows).
- **trl-precompute**: the same with ``precompute_ref_log_probs=True``, TRL's fastest setting
  without a reference model: the untrained policy scores every pair once in
  ``DPOTrainer.__init__``, before the timed steps (as ours is), timed apart
  (``reference_precompute_s``).

Printed per workload: *pair tokens/s* (prompt + chosen + rejected tokens of the pairs trained on,
each once: the cross-side figure, independent of the layout), peak memory, memory above the
static part (weights, gradients and AdamW states, plus the reference weights for TRL), padding,
and on H100/H200 the MFU: hardware FLOPs of what each side actually computed (``flops.py``: the
prompt once where shared, the lm_head on scored tokens only, attention, recompute) over the
card's dense bf16 peak. ``--out`` writes everything as JSON, rewritten as it goes.

Examples::

    python bench/train_vs_trl.py --size cpu --repeats 3            # busy CPU: median of 3
    python bench/train_vs_trl.py --size 1b --max-length 1024 2048 --micro-batch 16 8
    python bench/train_vs_trl.py --size 1b --find-max-batch         # GPU only
    python bench/train_vs_trl.py --plan plan.json --deadline EPOCH  # what gpu_check.sh runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402
import gpu_plan  # noqa: E402
import pair_lengths  # noqa: E402
import timing  # noqa: E402
import vs_trl_runners  # noqa: E402
from model_sizes import SIZES  # noqa: E402

# What each side runs: our module (shared prompt auto or off) or TRL (live or precomputed ref).
SIDES = {
    "ours": {"runner": "ours", "shared_prompt": None},
    "ours-unshared": {"runner": "ours", "shared_prompt": False},
    "trl": {"runner": "trl", "precompute_ref_log_probs": False},
    "trl-precompute": {"runner": "trl", "precompute_ref_log_probs": True},
}
OTHERS = ("trl", "trl-precompute", "ours-unshared")


def build_model_dir(size: str, seed: int, folder: Path) -> int:
    """Save a random Llama of ``size`` and a word-level tokenizer over its vocab; return #params."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    settings = SIZES[size]
    config = LlamaConfig(
        **settings["model"],
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        pad_token_id=pair_lengths.PAD_ID,
        bos_token_id=pair_lengths.BOS_ID,
        eos_token_id=pair_lengths.EOS_ID,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # GPU: a faster init
        model = LlamaForCausalLM(config).to(getattr(torch, settings["dtype"]))
    model.save_pretrained(folder)
    num_params = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():  # the sides' processes need the card, not this one's cache
        torch.cuda.empty_cache()
    # TRL needs a tokenizer (pad/eos ids); the data is pre-tokenized so any vocab of the right
    # size does: "<pad>", "<s>", "</s>", then w3 ... w{V-1}.
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, config.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    return num_params


# ---- settings -------------------------------------------------------------------------------


def settings_from_args(args) -> dict:
    """The run's settings (the shape of ``gpu_plan.BENCHMARK``): from ``--plan`` or the flags."""
    if args.plan:
        return json.loads(args.plan.read_text())["run"]
    lengths = args.max_length or ([2048] if args.find_max_batch else SIZES[args.size]["max_length"])
    batches = args.micro_batch or SIZES[args.size]["micro_batch"]
    if len(batches) not in (1, len(lengths)):
        raise SystemExit("--micro-batch takes one value, or one per --max-length.")
    batches = batches * len(lengths) if len(batches) == 1 else batches
    workloads = [] if args.find_max_batch else [list(w) for w in zip(lengths, batches)]
    search = args.find_max_batch or args.with_find_max_batch
    search_sides = args.find_max_batch_sides or args.sides
    return {
        "size": args.size,
        "window_s": args.window_s,
        "warmup_steps": args.warmup_steps,
        "pool_steps": args.pool_steps,
        "in_process": args.in_process,
        "sides": [
            {"side": s, "workloads": workloads, "find_max_batch": search and s in search_sides}
            for s in args.sides
        ],
        "find_max_batch": {
            "max_length": lengths[-1],
            "min_batch": args.min_batch,
            "cap": args.max_batch_cap,
        },
    }


def side_spec(args, bench: dict, side: dict, model_dir: Path, search_deadline) -> dict:
    """Everything one side's process needs (JSON)."""
    import torch

    from treg_lightning.models.loading import flash_attn_available

    cuda_flash = torch.cuda.is_available() and flash_attn_available()
    vocab = SIZES[bench["size"]]["model"]["vocab_size"]
    workloads = []
    for max_length, micro_batch in side["workloads"]:
        count = bench["pool_steps"] * micro_batch
        lengths = pair_lengths.sample(
            count,
            max_length,
            args.seed,
            scale=args.length_scale,
            response_scale=args.response_scale,
        )
        rows = pair_lengths.make_rows(lengths, vocab, args.seed)
        workloads.append({"max_length": max_length, "micro_batch": micro_batch, "rows": rows})
    search = None
    if side["find_max_batch"]:
        first_try_s = 0.0
        if torch.cuda.is_available():
            a = gpu_plan.ASSUMPTIONS
            first_try_s = a["trainer_setup_s"][SIDES[side["side"]]["runner"]] + a["first_step_s"]
        search = {
            **bench["find_max_batch"],
            "deadline": search_deadline,
            "first_try_s": first_try_s,
        }
    return {
        "side": side["side"],
        **SIDES[side["side"]],
        "model_dir": str(model_dir),
        "dtype": SIZES[bench["size"]]["dtype"],
        "attn": "flash_attention_2" if cuda_flash else "sdpa",
        "packing": {"on": True, "off": False, "auto": cuda_flash}[args.ours_packing],
        "ours_gradient_checkpointing": args.ours_gradient_checkpointing == "on",
        "compile": args.compile,
        "trl_compact_head": args.trl_compact_head_on_cpu,
        "length_grouping": not args.no_length_grouping,
        "warmup_steps": bench["warmup_steps"],
        "window_s": bench["window_s"],
        "lr": args.lr,
        "beta": args.beta,
        "alpha": args.alpha,
        "seed": args.seed,
        "workloads": workloads,
        "search": search,
    }


# ---- one side's process ---------------------------------------------------------------------


def run_side(spec: dict, workdir: Path, timeout: float, in_process: bool) -> dict:
    """Run one side (a child process, or this one with ``in_process``); returns what it wrote,
    plus ``ok``/``error`` for the process as a whole."""
    side = spec["side"]
    spec_path, result_path = workdir / f"{side}-spec.json", workdir / f"{side}-result.json"
    spec.update(result_path=str(result_path), launched_at=time.time())
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    status = {"ok": True}
    if in_process:  # code-path checks: the child's code without a new interpreter
        try:
            vs_trl_runners.main_child(str(spec_path))
        except Exception:  # noqa: BLE001 -- reported like a failed child
            status = {"ok": False, "error": traceback.format_exc()[-3000:]}
    else:
        command = [sys.executable, __file__, "--child", str(spec_path)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=max(1, timeout), env=env
            )
            if proc.returncode != 0:
                status = {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
            print(proc.stdout[-2000:], end="", flush=True)
        except subprocess.TimeoutExpired:
            status = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    out = json.loads(result_path.read_text()) if result_path.exists() else {}
    return {**out, **status, "wall_s": time.time() - spec["launched_at"], "in_process": in_process}


def static_bytes(num_params: int, dtype: str, reference_model: bool) -> int:
    """Weights + gradients + two AdamW states of the policy (all in the parameter dtype, as
    torch.optim.AdamW keeps them), plus the reference weights when a reference model is held."""
    width = 2 if dtype == "bfloat16" else 4
    return (4 + (1 if reference_model else 0)) * num_params * width


def summarize(result: dict, num_params: int, dtype: str, device: str, rss_base: int) -> dict:
    """Rates, memory above static, MFU of one workload's result."""
    if not result.get("ok"):
        return result
    result["pair_tokens_per_s"] = result["pair_tokens"] / result["elapsed_s"]
    result["pair_tokens_per_cpu_s"] = result["pair_tokens"] / max(result["cpu_s"], 1e-9)
    result["padding_share"] = 1 - result["nonpadding_computed_tokens"] / result["computed_tokens"]
    result["static_bytes"] = static_bytes(num_params, dtype, result.get("reference_model", False))
    result["peak_bytes"] = result.get("peak_cuda_bytes", result.get("peak_rss_bytes"))
    # On CPU, RSS also holds the interpreter and libraries: subtract the RSS after imports.
    baseline = 0 if "peak_cuda_bytes" in result else rss_base
    result["above_static_bytes"] = result["peak_bytes"] - baseline - result["static_bytes"]
    result["hardware_flops_per_s"] = result["flops"] / result["elapsed_s"]
    peak = flops.peak_bf16_flops(device)
    if peak and dtype == "bfloat16":
        result["mfu"] = result["hardware_flops_per_s"] / peak
    return result


# ---- repeats, ratios, tables ----------------------------------------------------------------


def median_run(runs: list[dict]) -> dict:
    """The successful run of median pair tokens/s (the lower middle one of an even count), with
    every run's rate and their spread (:func:`timing.spread`)."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return runs[-1] if runs else {"ok": False, "error": "not run"}
    ranked = sorted(ok, key=lambda r: r["pair_tokens_per_s"])
    middle = dict(ranked[(len(ranked) - 1) // 2])
    middle["pair_tokens_per_s_all_runs"] = [round(r["pair_tokens_per_s"], 2) for r in ok]
    middle["pair_tokens_per_cpu_s_all_runs"] = [round(r["pair_tokens_per_cpu_s"], 2) for r in ok]
    middle["pair_tokens_per_s_spread"] = timing.spread([r["pair_tokens_per_s"] for r in ok])
    middle["timed_s_all_runs"] = [round(r["elapsed_s"], 2) for r in ok]
    return middle


def repeat_ratios(runs: dict[str, list[dict]]) -> dict:
    """ours / other pair tokens/s of each repeat (the sides alternate, so repeat i of both saw
    the same phase of the machine's load), as a median with its spread."""
    out = {}
    for other in OTHERS:
        pairs = zip(runs.get("ours", []), runs.get(other, []), strict=False)
        values = [
            a["pair_tokens_per_s"] / b["pair_tokens_per_s"]
            for a, b in pairs
            if a.get("ok") and b.get("ok")
        ]
        if values:
            out[f"ours/{other}"] = timing.spread(values)
    return out


def ratios(results: dict) -> dict:
    """ours / each other side: pair tokens/s, per CPU-second, peak memory, memory above static."""
    out = {}
    ours = results.get("ours", {})
    for other in OTHERS:
        theirs = results.get(other, {})
        if not (ours.get("ok") and theirs.get("ok")):
            continue
        out[f"ours/{other}"] = {
            "pair tokens/s": ours["pair_tokens_per_s"] / theirs["pair_tokens_per_s"],
            "pair tokens/cpu-s": ours["pair_tokens_per_cpu_s"] / theirs["pair_tokens_per_cpu_s"],
            "peak memory": ours["peak_bytes"] / theirs["peak_bytes"],
            "memory above static": ours["above_static_bytes"] / theirs["above_static_bytes"],
        }
    return out


def print_table(title: str, results: dict) -> None:
    mib = 2**20
    print(f"\n{title}")
    print(
        f"{'side':<16}{'pair tok/s':>11}{'tok/cpu-s':>11}{'peak MiB':>10}{'above static':>14}"
        f"{'padding':>9}{'window s':>10}{'MFU':>8}"
    )
    for side, r in results.items():
        if not r.get("ok"):
            print(f"{side:<16} FAILED: {r.get('error', '')[-400:]}")
            continue
        mfu = f"{100 * r['mfu']:7.1f}%" if "mfu" in r else f"{'-':>8}"
        print(
            f"{side:<16}{r['pair_tokens_per_s']:>11.1f}{r['pair_tokens_per_cpu_s']:>11.1f}"
            f"{r['peak_bytes'] / mib:>10.0f}{r['above_static_bytes'] / mib:>14.0f}"
            f"{100 * r['padding_share']:>8.0f}%{r['elapsed_s']:>10.1f}{mfu}"
        )
    for name, ratio in ratios(results).items():
        print(f"{name}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratio.items()))


# ---- the run --------------------------------------------------------------------------------


def search_deadline(args, side: str) -> float | None:
    """When a side's largest-micro-batch search must stop: the run's deadline less the plan's
    estimates of the later sides' processes; None (no limit) without ``--deadline``."""
    if args.deadline is None:
        return None
    reserve = gpu_plan.reserve_after(json.loads(args.plan.read_text()), side) if args.plan else 0
    return args.deadline - reserve


def benchmark(args, bench: dict, model_dir: Path, num_params: int, workdir: Path, report, save):
    """Every side's process, ``--repeats`` times alternating; fills ``report`` as it goes."""
    import torch

    dtype = SIZES[bench["size"]]["dtype"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    runs: dict[str, dict[str, list]] = {}
    report.update(runs={}, find_max_batch={}, processes={})
    for repeat in range(args.repeats):  # sides alternate: slow phases of a busy machine hit all
        for side in bench["sides"]:
            name = side["side"]
            left = (args.deadline - time.time()) if args.deadline else args.timeout
            if left <= 0:
                raw = {"ok": False, "error": "not run: the deadline had passed"}
            else:
                spec = side_spec(args, bench, side, model_dir, search_deadline(args, name))
                count = len(spec["workloads"])
                print(f"[repeat {repeat + 1}] {name}: {count} workloads", flush=True)
                raw = run_side(spec, workdir, min(args.timeout, left), bench["in_process"])
            rss_base = raw.get("rss_after_imports_bytes", 0)
            for key, result in raw.get("workloads", {}).items():
                result = summarize(result, num_params, dtype, device, rss_base)
                runs.setdefault(key, {}).setdefault(name, []).append(result)
            if not raw.get("workloads") and not raw["ok"]:
                for length, _ in side["workloads"]:
                    runs.setdefault(str(length), {}).setdefault(name, []).append(raw)
            if "search" in raw:
                report["find_max_batch"][name] = raw["search"]
            process = {k: v for k, v in raw.items() if k not in ("workloads", "search")}
            report["processes"].setdefault(name, []).append(process)
            _collect(runs, report, args.repeats > 1)
            save()
    _collect(runs, report, args.repeats > 1, show=True)
    save()


def _collect(runs: dict, report: dict, repeated: bool, show: bool = False) -> None:
    for key, by_side in runs.items():
        results = {side: median_run(side_runs) for side, side_runs in by_side.items()}
        entry = {**results, "ratios": ratios(results)}
        if repeated:
            entry["repeat_ratios"] = repeat_ratios(by_side)
        report["runs"][key] = entry
        if show:
            batches = sorted({r.get("micro_batch") for r in results.values() if r.get("ok")})
            print_table(f"max length {key}, micro-batch {batches} pairs", results)
            for name, stats in entry.get("repeat_ratios", {}).items():
                print(f"{name} pair tokens/s per repeat: {timing.format_spread(stats)}")
            for side, r in results.items():
                if r.get("ok"):
                    floor = timing.MIN_GPU_WINDOW_S if "peak_cuda_bytes" in r else None
                    timed = min(r["timed_s_all_runs"])
                    note = timing.short_window_note(timed, side, floor or timing.MIN_WINDOW_S)
                    if note:
                        print(note)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--max-length", type=int, nargs="+", help="one workload per value")
    parser.add_argument("--micro-batch", type=int, nargs="+",
                        help="pairs per optimizer step: one, or one per --max-length")  # fmt: skip
    parser.add_argument("--window-s", type=float, default=timing.MIN_WINDOW_S,
                        help="timed seconds per workload (at least one step)")  # fmt: skip
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--pool-steps", type=int, default=16,
                        help="micro-batches of pairs drawn per workload, cycled")  # fmt: skip
    parser.add_argument("--lr", type=float, default=5e-7)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.25, help="T-REG strength (0 = plain DPO)")
    parser.add_argument("--length-scale", type=float, default=1.0, help="stretch real lengths")
    parser.add_argument("--response-scale", type=float, default=1.0,
                        help="stretch the responses only (8: UltraFeedback-like)")  # fmt: skip
    parser.add_argument("--sides", nargs="+", choices=list(SIDES),
                        default=["ours", "trl", "trl-precompute"])  # fmt: skip
    parser.add_argument("--ours-packing", choices=["auto", "on", "off"], default="auto",
                        help="auto: pack when CUDA + flash-attn are available")  # fmt: skip
    parser.add_argument("--ours-gradient-checkpointing", choices=["on", "off"], default="on",
                        help="on = the same as TRL's default")  # fmt: skip
    parser.add_argument("--no-length-grouping", action="store_true")
    parser.add_argument("--trl-compact-head-on-cpu", action="store_true",
                        help="let TRL's fused LM head score only completion tokens on CPU too, "
                        "as it does on CUDA (default: TRL as installed)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile our decoder layers")
    parser.add_argument(
        "--find-max-batch",
        action="store_true",
        help="only find the largest micro-batch at the last --max-length",
    )
    parser.add_argument("--with-find-max-batch", action="store_true",
                        help="after the throughput runs, also find the largest micro-batch "
                        "(in the same processes)")  # fmt: skip
    parser.add_argument("--find-max-batch-sides", nargs="+", choices=list(SIDES),
                        help="sides for the largest micro-batch (default: --sides)")  # fmt: skip
    parser.add_argument("--min-batch", type=int, default=1, help="first micro-batch tried")
    parser.add_argument("--max-batch-cap", type=int, default=256,
                        help="largest micro-batch tried; given explicitly, --find-max-batch "
                        "also runs on CPU (a code-path check: no OOM stops it there)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per side process")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the sides alternately this many times; each side reports "
                        "its median run and the spread, the ratios per repeat too (3 or more "
                        "on busy machines)")  # fmt: skip
    parser.add_argument("--in-process", action="store_true",
                        help="run the sides in this process (a quick code-path check: memory "
                        "figures are the whole process's, not one side's)")  # fmt: skip
    parser.add_argument("--plan", type=Path,
                        help="run the 'run' settings of a gpu_plan.py plan (sides, workloads, "
                        "window, search) instead of the flags above")  # fmt: skip
    parser.add_argument("--deadline", type=float,
                        help="epoch seconds by which the run must end: bounds each side's "
                        "process and, with --plan, the largest-micro-batch searches")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be >= 1 (the clock starts at the end of warm-up)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        vs_trl_runners.main_child(args.child)
        return
    bench = settings_from_args(args)
    if any(s["find_max_batch"] for s in bench["sides"]) and not args.plan:
        import torch

        if not torch.cuda.is_available() and "--max-batch-cap" not in " ".join(argv or sys.argv):
            raise SystemExit(
                "--find-max-batch needs a CUDA device (it doubles the batch until OOM); on CPU "
                "give --max-batch-cap N to check the code path up to N pairs."
            )
    print(f"pair lengths from {pair_lengths.LENGTHS_FILE.name}; size {bench['size']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="treg-bench-") as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        num_params = build_model_dir(bench["size"], args.seed, workdir / "model")
        build_s = time.perf_counter() - start
        print(f"model: {num_params / 1e6:.1f}M parameters, built in {build_s:.0f} s", flush=True)
        report = {
            "size": bench["size"],
            "num_params": num_params,
            "dtype": SIZES[bench["size"]]["dtype"],
            "length_source": "bench/data/hh_lengths.json",
            "settings": bench,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpu_count": os.cpu_count(),
            "load_average_start": os.getloadavg(),
            "build_model_s": build_s,
        }

        def save():
            if args.out:
                args.out.write_text(json.dumps(report, indent=2))

        benchmark(args, bench, workdir / "model", num_params, workdir, report, save)
        report["load_average_end"] = os.getloadavg()
        save()
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
