"""Train the same model on the same preference pairs with treg-lightning and with TRL's DPOTrainer.

Both sides train one randomly initialised Llama-shaped model, saved once to a temporary folder,
on the same pairs (lengths drawn from real data), with the same micro-batch, AdamW with the same
learning rate and no weight decay, gradient-norm clipping at 1.0 (TRL's default, done on our side
too), for the same number of timed steps after the same number of warm-up steps. Each side runs in
its own subprocess, so its peak memory (CUDA ``max_memory_allocated``, or peak RSS on CPU) is its
own.

- **ours**: :class:`treg_lightning.module.PreferenceModule` (``compute_loss``, the module's own
  code path: one policy forward over chosen + rejected, chunked token log-probs,
  :class:`~treg_lightning.losses.DPOLoss` + :class:`~treg_lightning.losses.TokenRewardRegularizer`
  with ``alpha`` = 0.25 and token rewards uniform in (-0.5, 0.5) standing in for the cached
  ``r_hat``). Reference token log-probs are computed once before timing, as the annotate pass
  does, and served from the batch (``live_reference=False``: no reference model in memory).
  Batches come from :class:`~treg_lightning.data.collate.PreferenceCollator` in the order of
  :class:`~treg_lightning.data.collate.LengthGroupedSampler`. With flash-attn installed (CUDA),
  the module packs chosen and rejected padding-free (``packing=True``,
  :mod:`treg_lightning.forward.packing`, varlen attention); otherwise each pair's prompt is
  computed once (``shared_prompt`` auto, :mod:`treg_lightning.forward.shared_prompt`: one padded
  row ``[prompt, chosen, rejected]`` per pair, sdpa).
- **ours-unshared**: the same with ``shared_prompt=False`` (chosen and rejected as two padded
  sequences, each with its own copy of the prompt): the shared prompt's gain.
- **trl**: ``trl.DPOTrainer`` with ``loss_type="sigmoid"``, a live reference model
  (``precompute_ref_log_probs=False``), its default gradient checkpointing, pairs in the given
  (random) order; the only override feeds it the same token ids (``_prepare_dataset`` returns the
  pre-tokenized rows, which are exactly what TRL's own tokenization would produce).
- **trl-precompute**: the same with ``precompute_ref_log_probs=True``, TRL's fastest setting
  without a reference model: in ``DPOTrainer.__init__`` (trl 1.16 ``_precompute_ref_logps``) the
  policy, still untrained, scores every pair once under ``no_grad`` and the sequence logps are
  stored as dataset columns; ``ref_model`` is None (no reference weights in memory) and each step
  reads the columns. The precompute runs before ``trainer.train()``, so the timed steps exclude
  it, as they exclude ours; its seconds are reported apart (``reference_precompute_s``).

Printed: non-padding tokens per second (prompt + response tokens of chosen and rejected, i.e. the
real tokens of both sequences of each pair, counted so for every side: the shared prompt computes
fewer tokens for the same pairs), peak memory, memory above the static part (weights,
gradients and AdamW states of the policy, plus the reference weights for TRL, computed
analytically from the parameter count and dtype), and ours/TRL ratios; on H100/H200 also model
FLOPs utilisation. ``--out`` writes everything as JSON.

Examples::

    python bench/train_vs_trl.py --size cpu                      # ~2-4 minutes on 2 CPU cores
    python bench/train_vs_trl.py --size 1b --max-length 1024 2048 --out results.json
    python bench/train_vs_trl.py --size 1b --find-max-batch       # GPU only
    python bench/train_vs_trl.py --size 135m --sides ours ours-unshared --repeats 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402  (bench/timing.py)

HH_RLHF = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)
# Token length = whitespace words x 1.3 (a typical English BPE ratio; no tokenizer download).
TOKENS_PER_WORD = 1.3
# Stand-in when the data file is absent: lognormal (mean, std of log tokens) fitted to the
# 1,500 rows of hh-rlhf-harmless-base-test (prompt = text up to the last "\n\nAssistant:", words
# x 1.3). Medians of that file: prompt 81, chosen 27, rejected 35 tokens; 95th percentiles 324,
# 121, 150.
FALLBACK_LOGNORMAL = {
    "prompt": (4.202, 1.088),
    "chosen": (3.263, 0.982),
    "rejected": (3.465, 1.043),
}
ASSISTANT = "\n\nAssistant:"
# bf16 dense peak of one H100 SXM / H200 (NVIDIA datasheets), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}

# Llama-shaped models. "1b" is Llama-3.2-1B's shape (without its rope scaling), random weights.
SIZES = {
    "cpu": {
        "model": {
            "hidden_size": 256,
            "intermediate_size": 704,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "vocab_size": 32000,
        },
        "dtype": "float32",
        "max_length": [512],
        "warmup_steps": 2,
        "steps": 6,
    },
    # Checks the code paths only (bench/gpu_check.sh --dry-run): bfloat16 like "1b".
    "tiny": {
        "model": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
        },
        "dtype": "bfloat16",
        "max_length": [64],
        "warmup_steps": 1,
        "steps": 1,
    },
    # SmolLM2-135M's shape (the demo model): 30 narrow layers, so the decoder, not the lm_head,
    # holds most of the compute, as in real LLMs (in "cpu" the 32k x 256 embedding is 74 %).
    "135m": {
        "model": {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "rope_theta": 100000.0,
        },
        "dtype": "float32",
        "max_length": [512],
        "warmup_steps": 1,
        "steps": 3,
    },
    "1b": {
        "model": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "rope_theta": 500000.0,
        },
        "dtype": "bfloat16",
        "max_length": [1024],
        "warmup_steps": 5,
        "steps": 20,
    },
}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# What each side runs: our module (shared prompt auto or off) or TRL (live or precomputed ref).
SIDES = {
    "ours": {"runner": "ours", "shared_prompt": None},
    "ours-unshared": {"runner": "ours", "shared_prompt": False},
    "trl": {"runner": "trl", "precompute_ref_log_probs": False},
    "trl-precompute": {"runner": "trl", "precompute_ref_log_probs": True},
}


# ---- data ---------------------------------------------------------------------------------


def real_lengths() -> list[tuple[int, int, int]] | None:
    """(prompt, chosen, rejected) token lengths of every hh-rlhf row, or None without the file."""
    if not HH_RLHF.exists():
        return None
    lengths = []
    with gzip.open(HH_RLHF, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            cut = row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
            texts = (row["chosen"][:cut], row["chosen"][cut:], row["rejected"][cut:])
            lengths.append(tuple(max(1, round(len(t.split()) * TOKENS_PER_WORD)) for t in texts))
    return lengths


def sample_lengths(count: int, rng: random.Random, table) -> list[tuple[int, int, int]]:
    if table is not None:
        return [rng.choice(table) for _ in range(count)]
    return [
        tuple(max(1, round(rng.lognormvariate(*FALLBACK_LOGNORMAL[k]))) for k in FALLBACK_LOGNORMAL)
        for _ in range(count)
    ]


def truncate(
    lengths, max_length: int, scale: float, response_scale: float = 1.0
) -> tuple[int, int, int]:
    """The contract's rule: the prompt keeps at most max_length // 2 tokens (cut from the left),
    each response is cut so that prompt + response <= max_length. ``scale`` stretches all
    lengths, ``response_scale`` the responses only (UltraFeedback-like pairs)."""
    scales = (scale, scale * response_scale, scale * response_scale)
    prompt, chosen, rejected = (max(1, round(n * s)) for n, s in zip(lengths, scales))
    prompt = max(2, min(prompt, max_length // 2))  # BOS + at least one prompt token
    return prompt, min(chosen, max_length - prompt), min(rejected, max_length - prompt)


def make_rows(spec_lengths, vocab_size: int, rng: random.Random) -> list[dict]:
    """Cache-like rows: random ids with BOS/EOS, r_hat uniform in (-0.5, 0.5)."""

    def ids(n):
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    rows = []
    for index, (prompt, chosen, rejected) in enumerate(spec_lengths):
        row = {"index": index, "prompt_ids": [BOS_ID] + ids(prompt - 1)}
        for side, n in (("chosen", chosen), ("rejected", rejected)):
            row[f"{side}_ids"] = ids(n - 1) + [EOS_ID]
            row[f"{side}_token_rewards"] = [rng.random() - 0.5 for _ in range(n)]
        rows.append(row)
    return rows


def real_tokens(rows) -> int:
    return sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )


def padded_tokens(batches) -> int:
    """Tokens a padded [2B, T] forward computes (chosen and rejected padded to one length)."""
    total = 0
    for rows in batches:
        longest = max(
            len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows
        )
        total += 2 * len(rows) * longest
    return total


def shared_tokens(rows) -> int:
    """Tokens of the shared-prompt layout: prompt once, both responses, one copied prompt token."""
    return sum(
        len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) + 1 for r in rows
    )


def shared_padded_tokens(batches) -> int:
    """Tokens a shared-prompt [B, W] forward computes (one row per pair, padded to the longest)."""
    return sum(len(rows) * max(shared_tokens([r]) for r in rows) for rows in batches)


# ---- model --------------------------------------------------------------------------------


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
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # GPU: a faster init
        model = LlamaForCausalLM(config).to(getattr(torch, settings["dtype"]))
    model.save_pretrained(folder)
    num_params = sum(p.numel() for p in model.parameters())
    del model
    # TRL needs a tokenizer (pad/eos ids); the data is pre-tokenized so any vocab of the right
    # size does: "<pad>", "<s>", "</s>", then w3 ... w{V-1}.
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab |= {f"w{i}": i for i in range(3, config.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    return num_params


# ---- one side, in a child process ---------------------------------------------------------


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _memory(rss_after_imports: int) -> dict:
    import torch

    out = {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports_bytes": rss_after_imports,
    }
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        out["device_name"] = torch.cuda.get_device_name()
    return out


def _elapsed(stamps: list[tuple[float, float]], warmup: int) -> dict:
    """Wall seconds and process CPU seconds (all threads) of the timed steps. CPU seconds do not
    grow when other processes compete for the cores, so they compare runs on a busy machine."""
    (wall_end, cpu_end), (wall_start, cpu_start) = stamps[-1], stamps[warmup - 1]
    return {"elapsed_s": wall_end - wall_start, "cpu_s": cpu_end - cpu_start}


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cache_reference_logps(module, collator, batches, device) -> None:
    """What the annotate pass stores: reference token logps per response token, per row."""
    import torch

    with torch.no_grad():
        for rows in batches:
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            out = module.model_token_logps(module.policy, batch)
            for b, row in enumerate(rows):
                start = len(row["prompt_ids"])
                for side in ("chosen", "rejected"):
                    end = start + len(row[f"{side}_ids"])
                    values = out[side][b, start:end]
                    row[f"{side}_ref_token_logps"] = values.float().cpu().tolist()


def run_ours(spec: dict) -> dict:
    import torch

    from treg_lightning.data.collate import LengthGroupedSampler, PreferenceCollator, pair_lengths
    from treg_lightning.forward.batch import uses_shared_prompt
    from treg_lightning.losses import DPOLoss, TokenRewardRegularizer
    from treg_lightning.module import PreferenceModule

    rss_after_imports = _rss_now()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = PreferenceModule(
        model=spec["model_dir"],
        loss=DPOLoss(beta=spec["beta"]),
        regularizer=TokenRewardRegularizer(alpha=spec["alpha"]),
        live_reference=False,
        torch_dtype=spec["dtype"],
        attn_implementation=spec["attn"],
        gradient_checkpointing=spec["ours_gradient_checkpointing"],
        packing=spec["packing"],
        shared_prompt=spec["shared_prompt"],
    )
    module.configure_model()
    module.to(device).train()
    if spec["compile"]:
        for layer in getattr(module.policy, module.policy.base_model_prefix).layers:
            layer.compile(dynamic=True)

    rows, batch_size, warmup = spec["rows"], spec["micro_batch"], spec["warmup_steps"]
    warmup_rows, timed_rows = rows[: warmup * batch_size], rows[warmup * batch_size :]
    order = list(range(len(timed_rows)))
    if spec["length_grouping"] and timed_rows:
        sampler = LengthGroupedSampler(
            pair_lengths(timed_rows), batch_size, seed=spec["seed"], megabatch_size=spec["steps"]
        )
        order = list(sampler)
    timed_rows = [timed_rows[i] for i in order]
    batches = [rows[i : i + batch_size] for i in range(0, len(warmup_rows), batch_size)]
    batches += [timed_rows[i : i + batch_size] for i in range(0, len(timed_rows), batch_size)]
    collator = PreferenceCollator(pad_token_id=PAD_ID)

    start = time.perf_counter()
    _cache_reference_logps(module, collator, batches, device)
    _sync()
    reference_seconds = time.perf_counter() - start

    params = [p for p in module.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    losses, stamps = [], []
    for rows_of_batch in batches:
        batch = {k: v.to(device) for k, v in collator(rows_of_batch).items()}
        loss, _ = module.compute_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        stamps.append((time.perf_counter(), time.process_time()))
        losses.append(loss.item())
    timed_batches = batches[warmup:]
    shared = uses_shared_prompt(module.policy, spec["shared_prompt"])
    if shared:
        nonpadding = shared_tokens(timed_rows)
        computed = nonpadding if spec["packing"] else shared_padded_tokens(timed_batches)
    else:
        nonpadding = real_tokens(timed_rows)
        computed = nonpadding if spec["packing"] else padded_tokens(timed_batches)
    return {
        **_elapsed(stamps, warmup),
        "real_tokens": real_tokens(timed_rows),
        "computed_tokens": computed,
        "nonpadding_computed_tokens": nonpadding,
        "reference_precompute_s": reference_seconds,
        "reference_precompute_pairs": len(rows),
        "attn_implementation": module.policy.config._attn_implementation,
        "packing": spec["packing"],
        "shared_prompt": shared,
        "gradient_checkpointing": spec["ours_gradient_checkpointing"],
        "compile": spec["compile"],
        "losses": losses,
        **_memory(rss_after_imports),
    }


def run_trl(spec: dict) -> dict:
    import uuid

    import datasets
    import torch
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    # On some images datasets' fingerprinting fails (dill PicklingError on pyarrow's
    # MonthDayNano); a random fingerprint is harmless here (nothing is cached between runs).
    datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: uuid.uuid4().hex)
    if spec["trl_compact_head"]:
        import trl.trainer.utils

        # TRL's fused head scores only completion positions on Triton devices (CUDA) and every
        # position elsewhere; this makes CPU runs score what GPU runs score.
        trl.trainer.utils._use_triton = lambda device: True
    rss_after_imports = _rss_now()

    precompute_seconds = []

    class PreTokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer fed token ids: the rows already hold ``prompt_ids`` / ``chosen_ids`` /
        ``rejected_ids``, the very columns TRL's own tokenization produces; the rest is TRL's.
        The reference precompute (``precompute_ref_log_probs=True``, in ``__init__``) is timed."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            _sync()
            precompute_seconds.append(time.perf_counter() - start)
            return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.stamps.append((time.perf_counter(), time.process_time()))

    rows, warmup = spec["rows"], spec["warmup_steps"]
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    dataset = datasets.Dataset.from_list([{k: row[k] for k in columns} for row in rows])
    on_gpu = torch.cuda.is_available()
    output_dir = tempfile.mkdtemp(prefix="trl-bench-")
    config = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=spec["micro_batch"],
        max_steps=warmup + spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch",
        beta=spec["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=spec["precompute_ref_log_probs"],
        max_length=spec["max_length"],
        bf16=spec["dtype"] == "bfloat16",
        use_cpu=not on_gpu,
        model_init_kwargs={"dtype": spec["dtype"], "attn_implementation": spec["attn"]},
        train_sampling_strategy="sequential",  # the rows are already in a random order
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
    )
    clock = Clock()
    trainer = PreTokenizedDPOTrainer(
        model=spec["model_dir"],
        args=config,
        train_dataset=dataset,
        processing_class=PreTrainedTokenizerFast.from_pretrained(spec["model_dir"]),
        callbacks=[clock],
    )
    trainer.train()
    batch_size = spec["micro_batch"]
    timed_rows = rows[warmup * batch_size :]
    timed_batches = [timed_rows[i : i + batch_size] for i in range(0, len(timed_rows), batch_size)]
    if len(clock.stamps) != warmup + spec["steps"]:
        raise RuntimeError(f"TRL ran {len(clock.stamps)} steps, not {warmup + spec['steps']}.")
    return {
        **_elapsed(clock.stamps, warmup),
        "real_tokens": real_tokens(timed_rows),
        "computed_tokens": padded_tokens(timed_batches),
        "nonpadding_computed_tokens": real_tokens(timed_rows),
        "attn_implementation": trainer.model.config._attn_implementation,
        "gradient_checkpointing": config.gradient_checkpointing,
        "reference_model": trainer.ref_model is not None,
        "precompute_ref_log_probs": spec["precompute_ref_log_probs"],
        "reference_precompute_s": sum(precompute_seconds),
        "compact_head_patched": spec["trl_compact_head"],
        **_memory(rss_after_imports),
    }


def child_main(side: str, spec_path: str, result_path: str) -> None:
    spec = {**json.loads(Path(spec_path).read_text()), **SIDES[side]}
    result = run_ours(spec) if SIDES[side]["runner"] == "ours" else run_trl(spec)
    Path(result_path).write_text(json.dumps(result))


# ---- parent -------------------------------------------------------------------------------


def run_child(side: str, spec: dict, workdir: Path, timeout: int, in_process=False) -> dict:
    spec_path, result_path = workdir / f"{side}-spec.json", workdir / f"{side}-result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    if in_process:  # --in-process (code-path checks): the child's code without a new interpreter
        try:
            child_main(side, str(spec_path), str(result_path))
        except Exception:  # noqa: BLE001 -- reported like a failed child
            tail = traceback.format_exc()[-3000:]
            return {"ok": False, "oom": "out of memory" in tail.lower(), "error": tail}
        return {"ok": True, **json.loads(result_path.read_text()), "in_process": True}
    command = [sys.executable, __file__, "--child", side, str(spec_path), str(result_path)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        oom = "out of memory" in tail.lower() or "OutOfMemoryError" in tail
        return {"ok": False, "oom": oom, "returncode": proc.returncode, "error": tail}
    return {"ok": True, **json.loads(result_path.read_text())}


def static_bytes(num_params: int, dtype: str, reference_model: bool) -> int:
    """Weights + gradients + two AdamW states of the policy (all in the parameter dtype, as
    torch.optim.AdamW keeps them), plus the reference weights when a reference model is held
    (TRL with a live reference)."""
    width = 2 if dtype == "bfloat16" else 4
    copies = 4 + (1 if reference_model else 0)
    return copies * num_params * width


def summarize(result: dict, num_params: int, dtype: str, side: str) -> dict:
    if not result.get("ok"):
        return result
    result["tokens_per_s"] = result["real_tokens"] / result["elapsed_s"]
    result["tokens_per_cpu_s"] = result["real_tokens"] / result["cpu_s"]
    result["padding_share"] = 1 - result["nonpadding_computed_tokens"] / result["computed_tokens"]
    reference_model = bool(result.get("reference_model", False))
    result["static_bytes"] = static_bytes(num_params, dtype, reference_model)
    peak = result.get("peak_cuda_bytes", result["peak_rss_bytes"])
    result["peak_bytes"] = peak
    # On CPU, RSS also holds the interpreter and libraries: subtract the RSS after imports.
    baseline = 0 if "peak_cuda_bytes" in result else result["rss_after_imports_bytes"]
    result["above_static_bytes"] = peak - baseline - result["static_bytes"]
    peak_flops = next(
        (v for k, v in PEAK_BF16_FLOPS.items() if k in result.get("device_name", "")), None
    )
    if peak_flops and dtype == "bfloat16":
        result["mfu"] = 6 * num_params * result["tokens_per_s"] / peak_flops
    return result


def median_run(runs: list[dict]) -> dict:
    """The successful run of median tokens/s (the lower middle one of an even count), with every
    run's tokens/s and their spread (:func:`timing.spread`): the fastest run would pick the
    least-disturbed outlier, and one run on a busy machine says nothing of its error."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return runs[-1]
    ranked = sorted(ok, key=lambda r: r["tokens_per_s"])
    middle = dict(ranked[(len(ranked) - 1) // 2])
    middle["tokens_per_s_all_runs"] = [round(r["tokens_per_s"], 2) for r in ok]
    middle["tokens_per_cpu_s_all_runs"] = [round(r["tokens_per_cpu_s"], 2) for r in ok]
    middle["tokens_per_s_spread"] = timing.spread([r["tokens_per_s"] for r in ok])
    middle["timed_s_all_runs"] = [round(r["elapsed_s"], 2) for r in ok]
    return middle


def repeat_ratios(runs: dict[str, list[dict]]) -> dict:
    """ours / other tokens/s of each repeat (the sides alternate, so repeat i of both saw the
    same phase of the machine's load), as a median with its spread."""
    out = {}
    for other in ("trl", "trl-precompute", "ours-unshared"):
        pairs = zip(runs.get("ours", []), runs.get(other, []), strict=False)
        values = [
            a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs if a.get("ok") and b.get("ok")
        ]
        if values:
            out[f"ours/{other}"] = timing.spread(values)
    return out


def short_windows(results: dict) -> list[str]:
    """A note for each side whose timed window was under ``timing.MIN_WINDOW_S``."""
    notes = []
    for side, r in results.items():
        if r.get("ok"):
            note = timing.short_window_note(
                min(r.get("timed_s_all_runs") or [r["elapsed_s"]]), side
            )
            if note:
                notes.append(note)
    return notes


def print_table(title: str, results: dict) -> None:
    mib = 2**20
    print(f"\n{title}")
    header = (
        f"{'side':<16}{'tokens/s':>11}{'tok/cpu-s':>11}{'peak MiB':>11}{'above static MiB':>18}"
    )
    header += f"{'padding':>9}"
    print(header + f"{'MFU':>8}")
    for side, r in results.items():
        if not r.get("ok"):
            print(f"{side:<16} FAILED: {r.get('error', '')[-400:]}")
            continue
        mfu = f"{100 * r['mfu']:7.1f}%" if "mfu" in r else f"{'-':>8}"
        print(
            f"{side:<16}{r['tokens_per_s']:>11.1f}{r['tokens_per_cpu_s']:>11.1f}"
            f"{r['peak_bytes'] / mib:>11.0f}"
            f"{r['above_static_bytes'] / mib:>18.0f}{100 * r['padding_share']:>8.0f}%{mfu}"
        )
    for name, ratio in ratios(results).items():
        print(f"{name}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratio.items()))


def ratios(results: dict) -> dict:
    """ours / each TRL setting (and ours / ours-unshared): tokens/s, tokens/cpu-s, memory."""
    out = {}
    ours = results.get("ours", {})
    for other in ("trl", "trl-precompute", "ours-unshared"):
        theirs = results.get(other, {})
        if not (ours.get("ok") and theirs.get("ok")):
            continue
        out[f"ours/{other}"] = {
            "tokens/s": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "tokens/cpu-s": ours["tokens_per_cpu_s"] / theirs["tokens_per_cpu_s"],
            "peak memory": ours["peak_bytes"] / theirs["peak_bytes"],
            "memory above static": ours["above_static_bytes"] / theirs["above_static_bytes"],
        }
    return out


def base_spec(args, model_dir: Path, max_length: int) -> dict:
    import torch

    from treg_lightning.models.loading import flash_attn_available

    cuda_flash = torch.cuda.is_available() and flash_attn_available()
    packing = {"on": True, "off": False, "auto": cuda_flash}[args.ours_packing]
    return {
        "model_dir": str(model_dir),
        "dtype": SIZES[args.size]["dtype"],
        "attn": "flash_attention_2" if cuda_flash else "sdpa",
        "packing": packing,
        "ours_gradient_checkpointing": args.ours_gradient_checkpointing == "on",
        "compile": args.compile,
        "trl_compact_head": args.trl_compact_head_on_cpu,
        "length_grouping": not args.no_length_grouping,
        "micro_batch": args.micro_batch,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "lr": args.lr,
        "beta": args.beta,
        "alpha": args.alpha,
        "max_length": max_length,
        "seed": args.seed,
    }


def benchmark(args, model_dir: Path, num_params: int, workdir: Path, table, out, save) -> dict:
    """Throughput runs per --max-length into ``out`` (``save()`` after each length)."""
    dtype = SIZES[args.size]["dtype"]
    for max_length in args.max_length:
        spec = base_spec(args, model_dir, max_length)
        rng = random.Random(args.seed)
        count = (args.warmup_steps + args.steps) * args.micro_batch
        lengths = [
            truncate(n, max_length, args.length_scale, args.response_scale)
            for n in sample_lengths(count, rng, table)
        ]
        spec["rows"] = make_rows(lengths, SIZES[args.size]["model"]["vocab_size"], rng)
        runs = {side: [] for side in args.sides}
        load = [os.getloadavg()]
        for repeat in range(args.repeats):  # sides alternate, so slow phases of a busy machine
            for side in args.sides:  # hit both
                print(f"[max_length {max_length}] {side}, run {repeat + 1}", flush=True)
                raw = run_child(side, spec, workdir, args.timeout, args.in_process)
                runs[side].append(summarize(raw, num_params, dtype, side))
                load.append(os.getloadavg())
        results = {side: median_run(side_runs) for side, side_runs in runs.items()}
        print_table(f"max_length {max_length}, micro-batch {args.micro_batch} pairs", results)
        spreads = repeat_ratios(runs)
        for name, stats in spreads.items():
            print(f"{name} tokens/s per repeat: {timing.format_spread(stats)}")
        if "ours" in results and results["ours"].get("ok"):
            results["ours"]["repeat_ratios"] = spreads
        for note in short_windows(results):
            print(note)
        out[str(max_length)] = {**results, "ratios": ratios(results), "load_average": load}
        save()
    return out


def find_max_batch(args, model_dir: Path, num_params: int, workdir: Path, out: dict, save) -> dict:
    """Double the micro-batch (from --min-batch) until a side runs out of memory; pairs are all
    max_length long (prompt max_length // 2, both responses filling the rest): what fits in the
    worst case. One optimizer step per try (the first step allocates the AdamW states, so it
    holds the peak). ``out`` is filled as it goes and ``save()`` called after each try, so a run
    cut short keeps what it found."""
    max_length = args.max_length[-1]
    prompt = max_length // 2
    for side in args.find_max_batch_sides or args.sides:
        largest, batch_size = 0, args.min_batch
        out[side] = {"max_micro_batch": None, "max_length": max_length, "tries": {}}
        while batch_size <= args.max_batch_cap:
            spec = base_spec(args, model_dir, max_length)
            spec.update(micro_batch=batch_size, warmup_steps=1, steps=0)
            rng = random.Random(args.seed)
            lengths = [(prompt, max_length - prompt, max_length - prompt)] * batch_size
            spec["rows"] = make_rows(lengths, SIZES[args.size]["model"]["vocab_size"], rng)
            raw = run_child(side, spec, workdir, args.timeout, args.in_process)
            status = "ok" if raw["ok"] else ("out of memory" if raw.get("oom") else "failed")
            print(f"[find-max-batch {side}] micro-batch {batch_size}: {status}", flush=True)
            peak = raw.get("peak_cuda_bytes", raw.get("peak_rss_bytes"))
            out[side]["tries"][str(batch_size)] = {"status": status, "peak_bytes": peak}
            if not raw["ok"]:
                if not raw.get("oom"):
                    print(raw.get("error", "")[-2000:])
                break
            largest, batch_size = batch_size, 2 * batch_size
            out[side]["max_micro_batch"] = largest
            save()
        out[side]["max_micro_batch"] = largest
        out[side]["capped"] = batch_size > args.max_batch_cap
        save()
    print(f"\nlargest micro-batch (pairs) at length {max_length}: {out}")
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--max-length", type=int, nargs="+", help="one run per value")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (>= 1)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps")
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
    parser.add_argument(
        "--with-find-max-batch",
        action="store_true",
        help="after the throughput runs, also find the largest micro-batch",
    )
    parser.add_argument(
        "--find-max-batch-sides",
        nargs="+",
        choices=list(SIDES),
        help="sides for the largest micro-batch (default: --sides)",
    )
    parser.add_argument("--min-batch", type=int, default=1, help="first micro-batch tried")
    parser.add_argument("--max-batch-cap", type=int, default=256,
                        help="largest micro-batch tried; given explicitly, --find-max-batch "
                        "also runs on CPU (a code-path check: no OOM stops it there)")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per side")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the sides alternately this many times; each side reports "
                        "its median run and the spread, the ratios per repeat too (3 or more "
                        "on busy machines)")  # fmt: skip
    parser.add_argument("--in-process", action="store_true",
                        help="run the sides in this process (a quick code-path check: memory "
                        "figures are the whole process's, not one side's)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = SIZES[args.size]
    args.max_length = args.max_length or ([2048] if args.find_max_batch else defaults["max_length"])
    args.warmup_steps = args.warmup_steps or defaults["warmup_steps"]
    args.steps = args.steps or defaults["steps"]
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be >= 1 (the clock starts at the end of warm-up)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return
    if args.find_max_batch or args.with_find_max_batch:
        import torch

        if not torch.cuda.is_available() and "--max-batch-cap" not in " ".join(argv or sys.argv):
            raise SystemExit(
                "--find-max-batch needs a CUDA device (it doubles the batch until OOM); on CPU "
                "give --max-batch-cap N to check the code path up to N pairs."
            )
    table = real_lengths()
    source = f"{HH_RLHF} (words x {TOKENS_PER_WORD})" if table else "lognormal stand-in"
    print(f"pair lengths from {source}; size {args.size}", flush=True)
    with tempfile.TemporaryDirectory(prefix="treg-bench-") as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        num_params = build_model_dir(args.size, args.seed, workdir / "model")
        seconds = time.perf_counter() - start
        print(f"model: {num_params / 1e6:.1f}M parameters, built in {seconds:.0f} s", flush=True)
        report = {
            "size": args.size,
            "num_params": num_params,
            "dtype": SIZES[args.size]["dtype"],
            "length_source": source,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpu_count": os.cpu_count(),
        }

        def save():
            if args.out:
                args.out.write_text(json.dumps(report, indent=2))

        if not args.find_max_batch:
            report["runs"] = {}
            benchmark(args, workdir / "model", num_params, workdir, table, report["runs"], save)
        if args.find_max_batch or args.with_find_max_batch:
            report["find_max_batch"] = {}
            find_max_batch(args, workdir / "model", num_params, workdir,
                           report["find_max_batch"], save)  # fmt: skip
        save()
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
