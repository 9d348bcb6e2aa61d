"""The GPU check's plan: what ``bench/gpu_check.sh`` runs, and how long each step should take on
one H100/H200, from the cost model below (``ASSUMPTIONS``, the one place its numbers live).

    python bench/gpu_plan.py --out plan.json            # the plan of a real run
    python bench/gpu_plan.py --dry-run --out plan.json  # same estimates; tiny settings to run

The check must finish within ``budget_s`` (480 s) including model loads, so the mandatory steps'
estimates must add up to less; ``tests/bench/test_gpu_check.py`` checks the dry run's plan does. The
optional steps (the largest micro-batch per side, the flex-attention tests) run only when the
time actually left covers their estimate. The actual seconds of every step land next to the
estimates in ``$OUT/steps.json``, so a first GPU run calibrates the model.

Benchmark settings (``BENCHMARK``): one process per side, each looping over its workloads (one
model load per side): ``ours`` and ``trl-precompute`` at max length 1024 (micro-batch 16 pairs)
and 2048 (8 pairs); ``ours-unshared`` and ``trl`` (live reference) at 1024; each workload timed
over a window of at least ``window_s`` seconds after its warm-up steps; then, in the processes of
``ours`` and ``trl-precompute``, the largest micro-batch of full-length pairs at 2048 if the
deadline allows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402
import pair_lengths  # noqa: E402
import timing  # noqa: E402
from model_sizes import SIZES, dtype_bytes, num_params  # noqa: E402

BUDGET_S = 480
# The cost model. Seconds on one H100/H200 box (16 cores, local disk); the step times come from
# flops.py at an assumed sustained rate. Each is an assumption until a GPU run measures it.
ASSUMPTIONS = {
    "environment_s": 15,  # interpreter + every import of the version check
    "wheel_install_s": 30,  # pip install --no-index from wheels/ (pyarrow is most of it)
    "cuda_tests_s": 120,  # the CUDA tests' slot (also their timeout): FSDP2 1B steps inside
    "flex_tests_s": 90,  # the flex-attention tests; the first Inductor compile is most of it
    "build_model_s": 25,  # parent imports, random init on the GPU, save_pretrained
    "process_start_s": {"ours": 15, "trl": 20},  # interpreter, imports, CUDA context
    "load_s_per_gb": 2.0,  # safetensors from the page cache to the GPU
    "trainer_setup_s": {"ours": 1, "trl": 5},  # per workload: optimizer, DPOTrainer + dataset
    "first_step_s": 5,  # a workload's first step: allocator growth, kernel selection
    "sustained_flops": 0.25 * 989e12,  # 25 % of the dense bf16 peak (flops.py's FLOPs)
    "summary_s": 5,
}
# What the check runs (real run); ``settings(dry_run=True)`` shrinks it for the CPU dry run.
BENCHMARK = {
    "size": "1b",
    "window_s": timing.MIN_GPU_WINDOW_S,
    "warmup_steps": 3,
    "pool_steps": 16,  # pairs drawn per workload = pool_steps x micro-batch, cycled
    "in_process": False,
    "sides": [
        {"side": "ours", "workloads": [[1024, 16], [2048, 8]], "find_max_batch": True},
        {"side": "trl-precompute", "workloads": [[1024, 16], [2048, 8]], "find_max_batch": True},
        {"side": "ours-unshared", "workloads": [[1024, 16]], "find_max_batch": False},
        {"side": "trl", "workloads": [[1024, 16]], "find_max_batch": False},
    ],
    "find_max_batch": {"max_length": 2048, "min_batch": 16, "cap": 256},
}
DRY_RUN = {
    "size": "tiny",
    "window_s": 0.2,
    "warmup_steps": 1,
    "pool_steps": 2,
    "in_process": True,  # make test's budget: no interpreter start-up per side
    "lengths": {1024: 32, 2048: 64},
    "micro_batch": {16: 2, 8: 2},
    "find_max_batch": {"max_length": 64, "min_batch": 1, "cap": 2},
}
RUNNER = {"ours": "ours", "ours-unshared": "ours", "trl": "trl", "trl-precompute": "trl"}


def settings(dry_run: bool) -> dict:
    """The benchmark settings to run: ``BENCHMARK``, or its tiny CPU version."""
    if not dry_run:
        return json.loads(json.dumps(BENCHMARK))
    sides = [
        {
            **side,
            "workloads": [
                [DRY_RUN["lengths"][length], DRY_RUN["micro_batch"][batch]]
                for length, batch in side["workloads"]
            ],
        }
        for side in BENCHMARK["sides"]
    ]
    keep = ("size", "window_s", "warmup_steps", "pool_steps", "in_process", "find_max_batch")
    return {**BENCHMARK, **{k: DRY_RUN[k] for k in keep}, "sides": sides}


# ---- estimates ----------------------------------------------------------------------------


def _step_flops(size: str, side: str, lengths: list[tuple[int, int, int]]) -> float:
    """Mean training FLOPs of one micro-batch of ``lengths`` for ``side`` (sdpa on the GPU:
    ``ours`` shares the prompt; TRL keeps a live reference in ``trl``)."""
    shape = flops.Shape.from_config(SIZES[size]["model"])
    shared = side == "ours"
    work = sum((flops.pair_work(*n, shared=shared) for n in lengths), flops.Work())
    reference = work if side == "trl" else None
    return flops.training_flops(shape, work, checkpointing=True, reference=reference)


def workload_s(size: str, side: str, max_length: int, micro_batch: int, bench: dict) -> float:
    """One workload inside a side's process: set-up, reference precompute over the pool,
    first step, warm-up steps, the timed window (whole passes over the pool)."""
    a = ASSUMPTIONS
    pool = pair_lengths.sample(bench["pool_steps"] * micro_batch, max_length, seed=0)
    step_s = _step_flops(size, side, pool) / bench["pool_steps"] / a["sustained_flops"]
    precompute_s = step_s / 4 if side in ("ours", "ours-unshared", "trl-precompute") else 0
    setup = a["trainer_setup_s"][RUNNER[side]]
    warm = a["first_step_s"] + bench["warmup_steps"] * step_s
    one_pass = bench["pool_steps"] * step_s
    window = math.ceil(bench["window_s"] / one_pass) * one_pass
    return setup + bench["pool_steps"] * precompute_s + warm + window


def side_s(side: dict, bench: dict) -> float:
    """A side's process: start, model load (twice with a live reference), its workloads."""
    a, size = ASSUMPTIONS, bench["size"]
    gigabytes = num_params(size) * dtype_bytes(size) / 1e9
    loads = 2 if side["side"] == "trl" else 1
    start = a["process_start_s"][RUNNER[side["side"]]] + loads * gigabytes * a["load_s_per_gb"]
    return start + sum(workload_s(size, side["side"], n, b, bench) for n, b in side["workloads"])


def search_s(side: str, bench: dict) -> float:
    """The largest-micro-batch search: one step per try, doubling up to the cap."""
    a, search = ASSUMPTIONS, bench["find_max_batch"]
    length, total, batch = search["max_length"], 0.0, search["min_batch"]
    full = (length // 2, length - length // 2, length - length // 2)
    while batch <= search["cap"]:
        step = _step_flops(bench["size"], side, [full] * batch) / a["sustained_flops"]
        total += a["trainer_setup_s"][RUNNER[side]] + a["first_step_s"] + step * 1.25
        batch *= 2
    return total


def build_plan(budget_s: float = BUDGET_S, dry_run: bool = False) -> dict:
    """The steps of a real GPU run with their estimated seconds and its settings
    (``benchmark``); ``run``: the settings to execute (the tiny ones in a dry run); ``fits``:
    the mandatory steps within ``budget_s``."""
    a, bench = ASSUMPTIONS, settings(False)
    steps = [
        {"name": "environment", "estimate_s": a["environment_s"]},
        {"name": "wheels", "estimate_s": a["wheel_install_s"]},
        {"name": "cuda tests", "estimate_s": a["cuda_tests_s"]},
        {"name": "build model", "estimate_s": a["build_model_s"]},
    ]
    for side in bench["sides"]:
        steps.append({"name": f"side {side['side']}", "estimate_s": side_s(side, bench)})
    for side in bench["sides"]:
        if side["find_max_batch"]:
            name = f"largest micro-batch {side['side']}"
            steps.append({"name": name, "estimate_s": search_s(side["side"], bench), "optional": 1})
    steps.append({"name": "flex tests", "estimate_s": a["flex_tests_s"], "optional": True})
    steps.append({"name": "summary", "estimate_s": a["summary_s"]})
    for step in steps:
        step["estimate_s"] = round(step["estimate_s"], 1)
        step["optional"] = bool(step.get("optional"))
    mandatory = sum(s["estimate_s"] for s in steps if not s["optional"])
    return {
        "budget_s": budget_s,
        "mandatory_s": round(mandatory, 1),
        "fits": mandatory <= budget_s,
        "steps": steps,
        "assumptions": a,
        "benchmark": bench,
        "run": settings(dry_run),
        "dry_run": dry_run,
    }


def reserve_after(plan: dict, side: str) -> float:
    """Estimated seconds of the sides' processes after ``side``'s: what its largest-micro-batch
    search must leave to them."""
    names = [s["name"] for s in plan["steps"]]
    after = plan["steps"][names.index(f"side {side}") + 1 :]
    return sum(s["estimate_s"] for s in after if s["name"].startswith("side "))


def format_plan(plan: dict) -> str:
    lines = [f"{'step':<46}{'estimate s':>11}"]
    for step in plan["steps"]:
        tag = " (optional)" if step["optional"] else ""
        lines.append(f"{step['name'] + tag:<46}{step['estimate_s']:>11.0f}")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"mandatory {plan['mandatory_s']:.0f} s of {plan['budget_s']:.0f} s: {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=BUDGET_S)
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU settings under 'run'")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    plan = build_plan(args.budget, args.dry_run)
    print(format_plan(plan))
    if args.out:
        args.out.write_text(json.dumps(plan, indent=2))
    return 0 if plan["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
