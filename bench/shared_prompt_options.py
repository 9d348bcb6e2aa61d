"""Ways to compute each pair's prompt once, timed against the unshared forward, on one process.

Every option computes the same ``{chosen,rejected}_token_logps`` of a batch of pairs and one
backward through a loss on them (forward + backward of the policy, chunked log-probs), on the
``train_vs_trl.py`` model shape of ``--size`` with pair lengths drawn from HH-RLHF
(``pair_lengths.py``: same sampling, truncation and length grouping as train_vs_trl.py). Each
round runs one batch through every option in turn; the table gives each option's median seconds
per step and its speed-up over the unshared padded batch (the module's default before shared
prompts) as the median of the per-round ratios, which compare the same batch and shrug off a
round slowed by other jobs.

- ``unshared-padded``: chosen and rejected stacked, ``[2B, T]``, sdpa (``concat_pairs``);
- ``unshared-packed``: all ``2B`` sequences in one row, block-diagonal bool mask, sdpa;
- ``shared-rows``: one pair per row ``[prompt, chosen, rejected]``, ``[B, 1, W, W]`` bool mask;
- ``shared-packed``: all pairs in one row, ``[1, 1, N, N]`` bool mask;
- ``shared-rows-flex`` / ``shared-packed-flex``: the same layouts through transformers'
  ``flex_attention`` (compiled flex kernel, BlockMask); skipped when it fails to compile here;
- ``kv-cache``: the prompts forwarded once (left-padded) with a KV cache, then both responses
  as a ``[2B, R]`` batch on the repeated cache (gradients flow through the cache).

    python bench/shared_prompt_options.py --rounds 5 --out shared_prompt_options.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import MethodType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pair_lengths as bench_pairs  # noqa: E402  (bench/pair_lengths.py)
import timing  # noqa: E402  (bench/timing.py)
from model_sizes import SIZES  # noqa: E402
from treg_lightning.data.collate import (  # noqa: E402
    LengthGroupedSampler,
    PreferenceCollator,
    pair_lengths,
)
from treg_lightning.forward.batch import (
    concat_pairs,  # noqa: E402
    shared_prompt_token_logps,  # noqa: E402
)
from treg_lightning.forward.logprobs import token_logps_from_hidden  # noqa: E402
from treg_lightning.forward.packing import pack_batch, packed_model_inputs, unpack_pairs  # noqa: E402


def _token_logps(lm, model_inputs, score_mask, chunk_size, softcap):
    """What PreferenceModule binds as ``lm.token_logps``: base model, then chunked log-probs."""
    hidden = lm.model(**model_inputs)[0]
    return token_logps_from_hidden(
        hidden, lm.lm_head.weight, model_inputs["input_ids"], score_mask, chunk_size, softcap
    )


CPU_TIME = False  # --cpu-time: process CPU seconds (all threads) instead of wall seconds


def build_model(size: str, attn: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SIZES[size]["model"], max_position_embeddings=8192, tie_word_embeddings=True,
        attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).train()
    model.config.use_cache = False
    model.token_logps = MethodType(_token_logps, model)
    return model


def unshared_padded(model, batch, chunk):
    pair = concat_pairs(batch)
    inputs = {"input_ids": pair["input_ids"], "attention_mask": pair["attention_mask"],
              "use_cache": False}  # fmt: skip
    logps = model.token_logps(inputs, pair["response_mask"], chunk, None)
    n = batch["chosen_input_ids"].shape[0]
    widths = [batch[f"{side}_input_ids"].shape[1] for side in ("chosen", "rejected")]
    return logps[:n, : widths[0]], logps[n:, : widths[1]]


def unshared_packed(model, batch, chunk):
    packed = pack_batch(batch)
    inputs = packed_model_inputs(packed, model.config._attn_implementation)
    return unpack_pairs(model.token_logps(inputs, packed["response_mask"], chunk, None), packed)


def shared(packed: bool):
    def run(model, batch, chunk):
        out = shared_prompt_token_logps(model, batch, chunk, None, packed=packed)
        return out["chosen"], out["rejected"]

    return run


def kv_cache(model, batch, chunk):
    """Prompt once with a cache, then the 2B responses on the cache repeated per side."""
    from treg_lightning.forward.shared_prompt import prompt_lengths

    lengths = prompt_lengths(batch)
    n, width = len(lengths), int(lengths.max())
    columns = torch.arange(width)[None]
    left_pad = width - lengths[:, None]
    source = (columns - left_pad).clamp(min=0)
    prompt_mask = columns >= left_pad
    prompt_ids = torch.where(prompt_mask, batch["chosen_input_ids"].gather(1, source), 0)
    base = model.model
    out = base(input_ids=prompt_ids, attention_mask=prompt_mask.long(),
               position_ids=source, use_cache=True)  # fmt: skip
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)  # rows: pair 0 chosen, pair 0 rejected, pair 1 ...
    sides = [(batch[f"{s}_input_ids"], batch[f"{s}_attention_mask"], batch[f"{s}_response_mask"])
             for s in ("chosen", "rejected")]  # fmt: skip
    resp_len = max(int((a.sum(-1) - lengths).max()) for _, a, _ in sides)
    j = torch.arange(resp_len)[None]
    ids, masks, scored = [], [], []
    for b in range(n):
        for side_ids, attention, response in sides:
            cols = (lengths[b] + j[0]).clamp(max=side_ids.shape[1] - 1)
            real = j[0] < attention[b].sum() - lengths[b]
            ids.append(torch.where(real, side_ids[b, cols], 0))
            masks.append(real)
            scored.append(real & response[b, cols])
    ids, masks, scored = torch.stack(ids), torch.stack(masks), torch.stack(scored)
    attention = torch.cat([prompt_mask.repeat_interleave(2, 0), masks], 1).long()
    positions = lengths.repeat_interleave(2)[:, None] + j
    hidden = base(input_ids=ids, attention_mask=attention, position_ids=positions,
                  past_key_values=cache, use_cache=True).last_hidden_state  # fmt: skip
    # The first response token is predicted by the prompt's last hidden state.
    last = out.last_hidden_state[:, -1:].repeat_interleave(2, 0)
    hidden = torch.cat([last, hidden], 1)
    ids = torch.cat([torch.zeros_like(ids[:, :1]), ids], 1)
    scored = torch.cat([torch.zeros_like(scored[:, :1]), scored], 1)
    logps = token_logps_from_hidden(hidden, model.lm_head.weight, ids, scored, chunk)[:, 1:]
    results = []
    for k, (side_ids, _, _) in enumerate(sides):
        side = torch.zeros(n, side_ids.shape[1], dtype=logps.dtype)
        for b in range(n):
            end = min(side_ids.shape[1], int(lengths[b]) + resp_len)
            side[b, lengths[b] : end] = logps[2 * b + k, : end - lengths[b]]
        results.append(side)
    return tuple(results)


def _rounds(batches, times: dict[str, list[float]], min_seconds: float):
    """The warm-up batch and the ``--rounds`` timed batches, then the timed batches again until
    every option still running was timed ``min_seconds`` in all."""
    yield from batches
    timed = batches[1:]
    extra = 0
    while timed and times and min(sum(v) for v in times.values()) < min_seconds:
        yield timed[extra % len(timed)]
        extra += 1


def step(fn, model, batch, chunk) -> tuple[float, tuple]:
    start = time.process_time() if CPU_TIME else time.perf_counter()
    chosen, rejected = fn(model, batch, chunk)
    loss = (chosen.sum() - rejected.sum()) / batch["chosen_input_ids"].shape[0]
    loss.backward()
    model.zero_grad(set_to_none=True)
    end = time.process_time() if CPU_TIME else time.perf_counter()
    return end - start, (chosen.detach(), rejected.detach())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="cpu", choices=sorted(SIZES))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--min-seconds", type=float, default=timing.MIN_WINDOW_S,
                   help="more rounds (cycling the batches) until every option was timed this "
                   "long in all (0: exactly --rounds)")  # fmt: skip
    p.add_argument("--response-scale", type=float, default=1.0, help="stretch responses only")
    p.add_argument("--options", nargs="+", help="subset of the options (default: all)")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time process CPU seconds instead of wall seconds (busy machines)",
    )
    args = p.parse_args(argv)
    global CPU_TIME
    CPU_TIME = args.cpu_time

    count = (args.rounds + 1) * args.micro_batch
    lengths = bench_pairs.sample(count, args.max_length, args.seed,
                                  response_scale=args.response_scale)  # fmt: skip
    vocab = SIZES[args.size]["model"]["vocab_size"]
    rows = bench_pairs.make_rows(lengths, vocab, args.seed)
    # Batches of similar length, as PreferenceDataModule serves them (LengthGroupedSampler).
    sampler = LengthGroupedSampler(pair_lengths(rows), args.micro_batch, seed=args.seed,
                                   megabatch_size=args.rounds + 1)  # fmt: skip
    rows = [rows[i] for i in sampler]
    collator = PreferenceCollator(pad_token_id=bench_pairs.PAD_ID)
    batches = [collator(rows[i : i + args.micro_batch]) for i in range(0, count, args.micro_batch)]
    dtype = getattr(torch, SIZES[args.size]["dtype"])
    sdpa, flex = build_model(args.size, "sdpa", dtype), None
    if args.checkpointing:  # as in training (kv-cache then fails: transformers drops the cache)
        sdpa.gradient_checkpointing_enable({"use_reentrant": False})
    options = {
        "unshared-padded": (unshared_padded, "sdpa"),
        "unshared-packed": (unshared_packed, "sdpa"),
        "shared-rows": (shared(False), "sdpa"),
        "shared-packed": (shared(True), "sdpa"),
        "shared-rows-flex": (shared(False), "flex"),
        "shared-packed-flex": (shared(True), "flex"),
        "kv-cache": (kv_cache, "sdpa"),
    }
    chosen = args.options or list(options)
    if any(options[name][1] == "flex" for name in chosen):
        flex = build_model(args.size, "flex_attention", dtype)
        flex.load_state_dict(sdpa.state_dict())
    times = {name: [] for name in chosen}
    errors, reference = {}, {}
    for round_index, batch in enumerate(_rounds(batches, times, args.min_seconds)):
        for name in list(times):
            fn, kind = options[name]
            try:
                seconds, logps = step(fn, flex if kind == "flex" else sdpa, batch, args.chunk)
            except Exception as error:  # noqa: BLE001 -- report an option that fails here
                errors[name] = f"{type(error).__name__}: {str(error)[:300]}"
                del times[name]
                continue
            if round_index == 0:
                reference.setdefault("logps", logps)
                diff = max((a - b).abs().max().item() for a, b in zip(logps, reference["logps"]))
                print(f"{name}: max |logp - unshared-padded| = {diff:.2e}", flush=True)
            else:
                times[name].append(seconds)
    base = times.get("unshared-padded")
    # Real tokens of both sequences of each pair (the prompt twice), per timed batch.
    size = args.micro_batch
    per_batch = [sum(2 * p + c + r for p, c, r in map(bench_pairs.triple, rows[i : i + size]))
                 for i in range(size, count, size)]  # fmt: skip
    report = {
        "size": args.size, "max_length": args.max_length, "micro_batch": args.micro_batch,
        "response_scale": args.response_scale, "rounds": args.rounds, "cpu_time": args.cpu_time,
        "length_source": "bench/data/hh_lengths.json",
        "load_average": os.getloadavg(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "checkpointing": args.checkpointing,
        "errors": errors, "options": {},
    }  # fmt: skip
    print(f"\n{'option':<20}{'median s/step':>14}{'tokens/s':>10}  vs unshared-padded per round")
    for name, values in times.items():
        median = statistics.median(values)
        tokens = sum(per_batch[i % len(per_batch)] for i in range(len(values)))
        entry = {"median_s": median, "all_s": [round(v, 4) for v in values],
                 "timed_s": sum(values), "rounds": len(values),
                 "tokens_per_s": tokens / sum(values)}  # fmt: skip
        if base:
            # Each round runs one batch through every option: the per-round ratio compares the
            # same work, and its median shrugs off a round slowed by other jobs.
            ratios = [b / v for b, v in zip(base, values)]
            entry["speedup"] = statistics.median(ratios)
            entry["speedup_spread"] = timing.spread(ratios)
            entry["speedup_per_round"] = [round(r, 3) for r in ratios]
        report["options"][name] = entry
        speed = timing.format_spread(entry["speedup_spread"]) if base else "-"
        print(f"{name:<20}{median:>14.3f}{entry['tokens_per_s']:>10.0f}  {speed}")
        note = timing.short_window_note(entry["timed_s"], name, args.min_seconds)
        if note:
            print(note)
    for name, error in errors.items():
        print(f"{name}: FAILED {error}")
    print(f"load average {report['load_average']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
