"""One side of ``train_vs_trl.py`` in one process: load the model once, then for each workload
(max length, micro-batch, pool of pairs) warm up, train over a timed window of at least
``window_s`` seconds cycling the pool, and record what was computed; then, if asked and the
deadline allows, double the micro-batch of full-length pairs until it no longer fits.

The result file is rewritten after every workload and every search try, so a process stopped by
a timeout keeps what it measured. Memory peaks are per workload: CUDA's peak counter, or the
process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) on CPU.
"""

from __future__ import annotations

import gc
import json
import os
import re
import tempfile
import time
from itertools import cycle
from pathlib import Path

import flops
import pair_lengths


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+) kB", handle.read()).group(1)) * 1024


def _reset_peak() -> int:
    """Start a workload's memory window; returns the bytes resident now (the model and
    whatever an earlier workload left behind)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _rss_bytes("VmRSS")


def _peak() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_cuda_bytes": torch.cuda.max_memory_allocated()}
    return {"peak_rss_bytes": _rss_bytes("VmHWM")}


def _is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def _window(step, batches, warmup: int, window_s: float) -> dict:
    """Run ``warmup`` steps, then steps until ``window_s`` wall seconds passed, cycling
    ``batches`` and ending on a whole number of passes over them, so that every side times the
    same pairs (at least one pass); returns the timed batches and the window's wall and CPU
    seconds."""
    source = cycle(batches)
    start = time.perf_counter()
    for _ in range(warmup):
        step(next(source))
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    warmup_s, timed = wall - start, []
    while len(timed) % len(batches) or not timed or time.perf_counter() - wall < window_s:
        batch = next(source)
        step(batch)
        _sync()
        timed.append(batch)
    return {
        "timed_batches": timed,
        "elapsed_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "warmup_s": warmup_s,
    }


def timed_work(
    shape,
    timed_batches,
    shared: bool,
    padded_positions,
    checkpointing: bool,
    reference: bool,
    compact_head: bool = True,
) -> dict:
    """What the timed batches computed: pair tokens, positions (with padding), real decoder
    tokens, attention pairs, lm_head positions and hardware FLOPs (flops.py), for a side that
    shares the prompt or not, checkpoints or not, runs a live reference or not."""
    rows = [r for batch in timed_batches for r in batch]
    work = sum(
        (flops.pair_work(*pair_lengths.triple(r), shared, compact_head) for r in rows),
        flops.Work(),
    )
    return {
        "steps": len(timed_batches),
        "pairs": len(rows),
        "pair_tokens": pair_lengths.pair_tokens(rows),
        "computed_tokens": padded_positions(timed_batches),
        "nonpadding_computed_tokens": work.tokens,
        "head_tokens": work.head_tokens,
        "attention_pairs": work.attention_pairs,
        "flops": flops.training_flops(shape, work, checkpointing, work if reference else None),
    }  # fmt: skip


# ---- ours -----------------------------------------------------------------------------------


class Ours:
    """``PreferenceModule.compute_loss`` (the module's own forward), reference token logps
    precomputed as the annotate pass caches them, AdamW, clipping at 1.0."""

    def __init__(self, spec: dict) -> None:
        import torch

        from treg_lightning.data.collate import PreferenceCollator
        from treg_lightning.forward.batch import uses_shared_prompt
        from treg_lightning.losses import DPOLoss, TokenRewardRegularizer
        from treg_lightning.module import PreferenceModule

        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.rss_after_imports, self.imported_at = _rss_bytes("VmRSS"), time.time()
        start = time.perf_counter()
        self.module = PreferenceModule(
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
        self.module.configure_model()
        self.module.to(self.device).train()
        if spec["compile"]:
            for layer in getattr(self.module.policy, self.module.policy.base_model_prefix).layers:
                layer.compile(dynamic=True)
        _sync()
        self.load_s = time.perf_counter() - start
        self.collator = PreferenceCollator(pad_token_id=pair_lengths.PAD_ID)
        self.shared = uses_shared_prompt(self.module.policy, spec["shared_prompt"])
        self.checkpointing = spec["ours_gradient_checkpointing"]

    def _batches(self, rows: list[dict], micro_batch: int) -> list[list[dict]]:
        from treg_lightning.data.collate import LengthGroupedSampler
        from treg_lightning.data.collate import pair_lengths as grouping

        order = list(range(len(rows)))
        if self.spec["length_grouping"]:
            steps = max(1, len(rows) // micro_batch)
            sampler = LengthGroupedSampler(
                grouping(rows), micro_batch, seed=self.spec["seed"], megabatch_size=steps
            )
            order = list(sampler)
        rows = [rows[i] for i in order]
        return [rows[i : i + micro_batch] for i in range(0, len(rows), micro_batch)]

    def _cache_reference_logps(self, batches) -> float:
        """What the annotate pass stores: reference token logps per response token, per row."""
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            for rows in batches:
                batch = {k: v.to(self.device) for k, v in self.collator(rows).items()}
                out = self.module.model_token_logps(self.module.policy, batch)
                for b, row in enumerate(rows):
                    begin = len(row["prompt_ids"])
                    for side in ("chosen", "rejected"):
                        end = begin + len(row[f"{side}_ids"])
                        values = out[side][b, begin:end]
                        row[f"{side}_ref_token_logps"] = values.float().cpu().tolist()
        _sync()
        return time.perf_counter() - start

    def _stepper(self):
        import torch

        params = [p for p in self.module.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.spec["lr"], weight_decay=0.0)
        losses = []

        def step(rows):
            batch = {k: v.to(self.device) for k, v in self.collator(rows).items()}
            loss, _ = self.module.compute_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())

        return step, losses

    def workload(self, rows: list[dict], micro_batch: int, shape) -> dict:
        resident = _reset_peak()
        start = time.perf_counter()
        batches = self._batches(rows, micro_batch)
        precompute_s = self._cache_reference_logps(batches)
        step, losses = self._stepper()
        setup_s = time.perf_counter() - start - precompute_s
        window = _window(step, batches, self.spec["warmup_steps"], self.spec["window_s"])
        padded = pair_lengths.shared_padded_tokens if self.shared else pair_lengths.padded_tokens
        counts = timed_work(
            shape, window.pop("timed_batches"), self.shared, padded, self.checkpointing, False
        )
        if self.spec["packing"]:
            counts["computed_tokens"] = counts["nonpadding_computed_tokens"]
        result = {
            **window,
            **counts,
            "setup_s": setup_s,
            "reference_precompute_s": precompute_s,
            "reference_precompute_pairs": len(rows),
            "resident_bytes": resident,
            "losses": [round(x, 5) for x in losses[:3]],
            "shared_prompt": self.shared,
            "packing": self.spec["packing"],
            "gradient_checkpointing": self.checkpointing,
            "attn_implementation": self.module.policy.config._attn_implementation,
            "compile": self.spec["compile"],
            **_peak(),
        }
        self.module.policy.zero_grad(set_to_none=True)
        return result

    def one_step(self, rows: list[dict]) -> None:
        """One optimizer step over ``rows`` as one micro-batch (the largest-batch search)."""
        self._cache_reference_logps([rows])
        step, _ = self._stepper()
        step(rows)
        _sync()
        self.module.policy.zero_grad(set_to_none=True)


# ---- TRL ------------------------------------------------------------------------------------

MAX_TIMED_STEPS = 1_000_000  # TRL's max_steps is only a cap: the window's callback stops it


class Trl:
    """``trl.DPOTrainer`` (sigmoid loss, its defaults: gradient checkpointing, live reference or
    ``precompute_ref_log_probs``), one trainer per workload on the policy (and reference) loaded
    once; fed the pool's token ids as they are."""

    def __init__(self, spec: dict) -> None:
        import uuid

        import datasets
        import torch
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        # On some images datasets' fingerprinting fails (dill PicklingError on pyarrow's
        # MonthDayNano); a random fingerprint is harmless here (nothing is cached between runs).
        datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: uuid.uuid4().hex)
        import trl.trainer.utils

        if spec["trl_compact_head"]:
            # TRL's fused head scores only completion positions on Triton devices (CUDA) and
            # every position elsewhere; this makes CPU runs score what GPU runs score.
            trl.trainer.utils._use_triton = lambda device: True
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.compact_head = bool(trl.trainer.utils._use_triton(self.device))
        self.rss_after_imports, self.imported_at = _rss_bytes("VmRSS"), time.time()
        start = time.perf_counter()
        kwargs = {"dtype": spec["dtype"], "attn_implementation": spec["attn"]}
        self.policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)
        self.reference = None
        if not spec["precompute_ref_log_probs"]:  # the live reference TRL would load itself
            self.reference = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)
            self.reference.to(self.device).eval()
        self.policy.to(self.device)
        _sync()
        self.load_s = time.perf_counter() - start
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["model_dir"])

    def _trainer(self, rows, micro_batch: int, max_steps: int, output_dir: str, callbacks=()):
        import datasets
        from trl import DPOConfig, DPOTrainer

        precompute_s = []

        class PreTokenizedDPOTrainer(DPOTrainer):
            """DPOTrainer fed token ids: the rows already hold ``prompt_ids`` / ``chosen_ids`` /
            ``rejected_ids``, the very columns TRL's own tokenization produces; the rest is
            TRL's. The reference precompute (in ``__init__``) is timed apart."""

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

            def _precompute_ref_logps(self, dataset, name, batch_size):
                start = time.perf_counter()
                out = super()._precompute_ref_logps(dataset, name, batch_size)
                _sync()
                precompute_s.append(time.perf_counter() - start)
                return out

        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        dataset = datasets.Dataset.from_list([{k: row[k] for k in columns} for row in rows])
        spec = self.spec
        config = DPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=micro_batch,
            max_steps=max_steps,
            learning_rate=spec["lr"],
            lr_scheduler_type="constant",
            weight_decay=0.0,
            optim="adamw_torch",
            beta=spec["beta"],
            loss_type=["sigmoid"],
            precompute_ref_log_probs=spec["precompute_ref_log_probs"],
            max_length=max(p + max(c, r) for p, c, r in map(pair_lengths.triple, rows)),
            bf16=spec["dtype"] == "bfloat16",
            use_cpu=self.device.type == "cpu",
            train_sampling_strategy="sequential",  # the pool is already in a random order
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=spec["seed"],
        )
        trainer = PreTokenizedDPOTrainer(
            model=self.policy,
            ref_model=self.reference,
            args=config,
            train_dataset=dataset,
            processing_class=self.tokenizer,
            callbacks=list(callbacks),
        )
        return trainer, precompute_s

    def _release(self, trainer) -> None:
        """Drop a workload's trainer (optimizer states, accelerate's autocast wrapper of the
        models' forward) so the next workload starts from the bare models."""
        from accelerate.utils import extract_model_from_parallel

        del trainer
        for model in (self.policy, self.reference):
            if model is not None:
                extract_model_from_parallel(model, keep_fp32_wrapper=False)
        self.policy.zero_grad(set_to_none=True)
        gc.collect()

    def workload(self, rows: list[dict], micro_batch: int, shape) -> dict:
        from transformers import TrainerCallback

        warmup, window_s = self.spec["warmup_steps"], self.spec["window_s"]

        passes = len(rows) // micro_batch  # TRL's sequential sampler cycles the pool

        class WindowClock(TrainerCallback):
            """Stamps each step; stops training once the timed window is long enough and ends
            on a whole number of passes over the pool (as ``_window`` does)."""

            def __init__(self):
                self.stamps = []

            def on_step_end(self, args, state, control, **kwargs):
                _sync()
                self.stamps.append((time.perf_counter(), time.process_time()))
                timed = len(self.stamps) - warmup
                if timed > 0 and timed % passes == 0:
                    if self.stamps[-1][0] - self.stamps[warmup - 1][0] >= window_s:
                        control.should_training_stop = True

        resident = _reset_peak()
        clock = WindowClock()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="trl-bench-") as output_dir:
            trainer, precompute = self._trainer(
                rows, micro_batch, warmup + MAX_TIMED_STEPS, output_dir, [clock]
            )
            setup_s = time.perf_counter() - start - sum(precompute)
            trainer.train()
            facts = {
                "attn_implementation": trainer.model.config._attn_implementation,
                "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
                "reference_model": trainer.ref_model is not None,
            }
            self._release(trainer)
        (w_end, c_end), (w_start, c_start) = clock.stamps[-1], clock.stamps[warmup - 1]
        batches = [rows[i : i + micro_batch] for i in range(0, len(rows), micro_batch)]
        timed = [batches[i % len(batches)] for i in range(warmup, len(clock.stamps))]
        counts = timed_work(
            shape,
            timed,
            False,
            pair_lengths.padded_tokens,
            facts["gradient_checkpointing"],
            facts["reference_model"],
            self.compact_head,
        )
        return {
            "elapsed_s": w_end - w_start,
            "cpu_s": c_end - c_start,
            "warmup_s": w_start - start - setup_s - sum(precompute),
            **counts,
            "setup_s": setup_s,
            "reference_precompute_s": sum(precompute),
            "resident_bytes": resident,
            "precompute_ref_log_probs": self.spec["precompute_ref_log_probs"],
            "compact_head": self.compact_head,
            "compact_head_patched": self.spec["trl_compact_head"],
            **facts,
            **_peak(),
        }

    def one_step(self, rows: list[dict]) -> None:
        """One optimizer step over ``rows`` as one micro-batch (the largest-batch search)."""
        with tempfile.TemporaryDirectory(prefix="trl-bench-") as output_dir:
            trainer, _ = self._trainer(rows, len(rows), 1, output_dir)
            try:
                trainer.train()
            finally:
                self._release(trainer)


# ---- the process ----------------------------------------------------------------------------


def search(runner, spec: dict, shape, out: dict, save) -> None:
    """Double the micro-batch of full-length pairs (prompt max_length // 2, both responses the
    rest: the worst case) from ``min_batch`` until a try runs out of memory, reaches ``cap`` or
    would end after ``deadline`` (epoch seconds, or None: no limit; the next try is assumed to
    take 2.5x the last, the first ``first_try_s``). One optimizer step per try: the first step
    allocates the AdamW states, so it holds the peak. Fills ``out`` as it goes."""
    settings = spec["search"]
    length, batch = settings["max_length"], settings["min_batch"]
    full = (length // 2, length - length // 2, length - length // 2)
    out.update(max_length=length, max_micro_batch=None, tries={}, stopped_by="cap")
    expected = settings["first_try_s"]
    while batch <= settings["cap"]:
        deadline = settings["deadline"]
        if deadline is not None and time.time() + expected > deadline:
            out["stopped_by"] = "deadline"
            break
        rows = pair_lengths.make_rows([full] * batch, shape.vocab_size, spec["seed"])
        _reset_peak()
        start = time.perf_counter()
        try:
            runner.one_step(rows)
            status = "ok"
        except Exception as error:  # noqa: BLE001 -- any failure ends the search, OOM expected
            status = "out of memory" if _is_oom(error) else f"failed: {error!r}"[:500]
        seconds = time.perf_counter() - start
        out["tries"][str(batch)] = {"status": status, "seconds": round(seconds, 2), **_peak()}
        print(f"[largest micro-batch {spec['side']}] {batch} pairs: {status}", flush=True)
        save()
        if status != "ok":
            out["stopped_by"] = "out of memory" if status == "out of memory" else "failure"
            break
        out["max_micro_batch"], expected, batch = batch, 2.5 * seconds, 2 * batch
    out["capped"] = out["stopped_by"] == "cap"
    gc.collect()


def run_side(spec: dict) -> dict:
    """Load the side's model once, run its workloads (and the search), writing
    ``spec["result_path"]`` after each."""
    runner = (Ours if spec["runner"] == "ours" else Trl)(spec)
    shape = flops.Shape.from_config(
        json.loads((Path(spec["model_dir"]) / "config.json").read_text())
    )
    result = {
        "start_s": runner.imported_at - spec["launched_at"],  # interpreter + imports
        "load_s": runner.load_s,
        "rss_after_imports_bytes": runner.rss_after_imports,
        "device_name": device_name(),
        "workloads": {},
    }
    path = Path(spec["result_path"])

    def save():
        path.write_text(json.dumps(result))

    for workload in spec["workloads"]:
        key = str(workload["max_length"])
        print(
            f"[{spec['side']}] max length {key}, micro-batch {workload['micro_batch']}", flush=True
        )
        try:
            result["workloads"][key] = {
                "ok": True,
                "max_length": workload["max_length"],
                "micro_batch": workload["micro_batch"],
                **runner.workload(workload["rows"], workload["micro_batch"], shape),
            }
        except Exception as error:  # noqa: BLE001 -- reported per workload, the next one runs
            import traceback

            result["workloads"][key] = {
                "ok": False,
                "oom": _is_oom(error),
                "error": traceback.format_exc()[-3000:],
            }
            gc.collect()
        save()
    if spec.get("search"):
        result["search"] = {}
        search(runner, spec, shape, result["search"], save)
    result["process_s"] = time.time() - spec["launched_at"]
    save()
    return result


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_side(spec)
