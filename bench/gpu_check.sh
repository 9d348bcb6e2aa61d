#!/usr/bin/env bash
# The GPU check: one call on one H100/H200 that ends within GPU_CHECK_BUDGET_S seconds (default
# 480), model loads included. Its plan (bench/gpu_plan.py: every step with its estimated seconds
# from the cost model written there) is printed first and written to $OUT/plan.json:
#   1. environment: versions (installing the missing wheels from wheels/, see below);
#   2. the CUDA tests, first: pytest -m gpu tests/test_gpu.py -k "not flex" (bf16 chunked
#      log-probs, packing, the shared prompt with sdpa, FSDP2 steps of the 1B shape with the
#      shipped precision), stopped at the end of their slot;
#   3. bench/train_vs_trl.py --plan: the Llama-3.2-1B shape, one process per side, each loading
#      the model once and looping over its workloads: ours and trl-precompute at max length 1024
#      (16 pairs per micro-batch) and 2048 (8 pairs), ours-unshared and trl (live reference) at
#      1024; each workload timed over at least 10 s after 3 warm-up steps; then, inside the
#      processes of ours and trl-precompute, the largest micro-batch of 2048-token pairs while
#      the deadline (the budget less the later sides' estimates) allows. Pair tokens/s, peak
#      memory and MFU (bench/flops.py) per workload;
#   4. optional, last: the flex-attention tests (pytest -k flex; the first Inductor compile is
#      slow), only when the time left covers their estimate;
#   5. the summary: figures, and each step's actual seconds next to its estimate.
# Everything lands in $OUT (default ./gpu-check-out): plan.json, environment.json,
# gpu-tests.log, flex-tests.log, train_vs_trl.json (rewritten as it goes: a run cut by the budget
# keeps what it measured), train_vs_trl.log, steps.json, summary.txt. Pair lengths come from
# bench/data/hh_lengths.json (committed), so no file outside the checkout is read.
#
# Needs python3 with CUDA torch, lightning, transformers, torchmetrics, accelerate, tokenizers,
# safetensors and pytest (the GPU image has them), plus datasets, trl and
# jsonargparse[signatures], which it installs from a wheels/ folder at the repository root with
# `pip install --no-index --find-links wheels/` when they are missing (no internet is used).
# Make that folder where pip works: `bench/fetch_gpu_wheels.sh` (CPython 3.12, manylinux x86-64,
# about 56 MB). wheels/ is git-ignored: copy it next to the checkout on the GPU machine, or tell
# whatever ships the work tree there to carry the ignored path `wheels`. PYTHON overrides the
# interpreter (default: .venv/bin/python when present, else python3).
#
#   bench/gpu_check.sh             # on the GPU machine
#   bench/gpu_check.sh --dry-run   # on CPU: every step with tiny shapes (tests/bench/test_gpu_check.py)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
elif [[ $# -gt 0 ]]; then
    echo "usage: bench/gpu_check.sh [--dry-run]" >&2
    exit 2
fi
OUT=${OUT:-./gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
mkdir -p "$OUT"
# A previous run's files would pass for this run's in the summary.
rm -f "$OUT"/{plan.json,environment.json,gpu-tests.log,flex-tests.log,train_vs_trl.json} \
    "$OUT"/{train_vs_trl.log,steps.json}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
log() { echo "[gpu_check $(($(date +%s) - START)) s] $*" | tee -a "$OUT/summary.txt"; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: > "$OUT/summary.txt"
: > "$OUT/steps.tsv"
STEP_START=$START
# step NAME STATUS: the seconds since the previous step ended, for steps.json.
step() {
    local now
    now=$(date +%s)
    printf '%s\t%s\t%s\n' "$1" $((now - STEP_START)) "$2" >> "$OUT/steps.tsv"
    STEP_START=$now
}

# ---- the plan ------------------------------------------------------------------------------
PLAN_ARGS=(--budget "$BUDGET" --out "$OUT/plan.json")
[[ $DRY_RUN == 1 ]] && PLAN_ARGS+=(--dry-run)
if ! "$PY" bench/gpu_plan.py "${PLAN_ARGS[@]}" | tee -a "$OUT/summary.txt"; then
    log "the plan's mandatory steps exceed the budget of $BUDGET s; see bench/gpu_plan.py"
    exit 2
fi
# estimate NAME: the plan's seconds for step NAME.
estimate() {
    "$PY" -c 'import json, sys
plan = json.load(open(sys.argv[1]))
print(int(next(s["estimate_s"] for s in plan["steps"] if s["name"] == sys.argv[2])))' \
        "$OUT/plan.json" "$1"
}
SUMMARY_S=$(estimate summary)

# ---- 1. what the steps need ----------------------------------------------------------------
ENVIRONMENT=$(cat <<'EOF'
import json, os, platform, sys
import datasets, docstring_parser, jsonargparse, lightning, pytest, torchmetrics, typeshed_client
import accelerate, torch, transformers, trl
from treg_lightning.models.loading import flash_attn_available
env = {
    "dry_run": sys.argv[2] == "1", "python": platform.python_version(), "torch": torch.__version__,
    "cuda": torch.version.cuda, "transformers": transformers.__version__, "trl": trl.__version__,
    "flash_attn": flash_attn_available(), "cpu_count": os.cpu_count(),
    "load_average": os.getloadavg(),
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
}
open(sys.argv[1], "w").write(json.dumps(env, indent=2))
print(env)
EOF
)
if ! "$PY" -c "$ENVIRONMENT" "$OUT/environment.json" "$DRY_RUN" 2>/dev/null; then
    step environment missing
    if [[ -d wheels ]]; then
        log "installing datasets, trl, jsonargparse[signatures] from wheels/ (no index)"
        "$PY" -m pip install -q --no-index --find-links wheels/ trl datasets \
            "jsonargparse[signatures]" || { log "pip install from wheels/ failed"; exit 2; }
    fi
    if ! "$PY" -c "$ENVIRONMENT" "$OUT/environment.json" "$DRY_RUN"; then
        log "missing packages (above). Run bench/fetch_gpu_wheels.sh where pip works and bring" \
            "the wheels/ folder along; torch, lightning, transformers, torchmetrics, accelerate" \
            "and pytest must be installed already."
        exit 2
    fi
    step wheels 0
else
    step environment 0
fi
if [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import torch; assert torch.cuda.is_available()"; then
    log "no CUDA device visible; use --dry-run on a CPU machine"
    exit 2
fi

# ---- 2. CUDA tests, flex-attention left for the end ----------------------------------------
if [[ $DRY_RUN == 1 ]]; then
    export TREG_GPU_DRY_RUN=1
fi
TESTS_S=$(estimate "cuda tests")
log "CUDA tests, flex-attention apart (slot $TESTS_S s, budget left $(left) s)"
timeout "$TESTS_S" "$PY" -m pytest -q -rA -s -m gpu -k "not flex" tests/test_gpu.py \
    -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
TESTS=$?
tail -n 15 "$OUT/gpu-tests.log"
log "CUDA tests exit status $TESTS (124: stopped at the end of the slot)"
step "cuda tests" "$TESTS"

# ---- 3. against TRL --------------------------------------------------------------------------
DEADLINE=$((START + BUDGET - SUMMARY_S))  # the searches also leave the later sides their time
if ((DEADLINE - $(date +%s) > 0)); then
    log "train_vs_trl.py --plan $OUT/plan.json (budget left $(left) s)"
    timeout "$((DEADLINE - $(date +%s)))" "$PY" bench/train_vs_trl.py --plan "$OUT/plan.json" \
        --deadline "$DEADLINE" --out "$OUT/train_vs_trl.json" > "$OUT/train_vs_trl.log" 2>&1
    BENCH_STATUS=$?
else
    BENCH_STATUS=124
    : > "$OUT/train_vs_trl.log"
fi
grep -v -i -e "warn" -e "it/s" -e "examples/s" "$OUT/train_vs_trl.log" | tail -n 40
log "train_vs_trl.py exit status $BENCH_STATUS (124: stopped by the budget; partial JSON kept)"
step benchmark "$BENCH_STATUS"

# ---- 4. optional: flex-attention -----------------------------------------------------------
FLEX_S=$(estimate "flex tests")
FLEX="skipped"
if (($(left) - SUMMARY_S >= FLEX_S)); then
    log "flex-attention tests (budget left $(left) s)"
    timeout "$(($(left) - SUMMARY_S))" "$PY" -m pytest -q -rA -s -m gpu -k flex \
        tests/test_gpu.py -p no:cacheprovider > "$OUT/flex-tests.log" 2>&1
    FLEX=$?
    tail -n 8 "$OUT/flex-tests.log"
    # pytest's 5: no test selected (the flex checks may live in another test's name).
    log "flex-attention tests exit status $FLEX (5: none selected)"
else
    log "flex-attention tests skipped: $(left) s left, $FLEX_S s needed"
fi
step "flex tests" "$FLEX"

# ---- summary -------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
plan = json.loads((out / "plan.json").read_text())
estimates = {s["name"]: s["estimate_s"] for s in plan["steps"]}
try:
    report = json.loads((out / "train_vs_trl.json").read_text())
except (OSError, ValueError) as error:
    report = {}
    print(f"no benchmark JSON: {error}")
for length, results in report.get("runs", {}).items():
    for side, r in results.items():
        if side in ("ratios", "repeat_ratios"):
            continue
        if not r.get("ok"):
            print(f"{length} {side}: FAILED")
            continue
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(f"{length} {side}: {r['pair_tokens_per_s']:.0f} pair tokens/s over "
              f"{r['elapsed_s']:.1f} s, micro-batch {r['micro_batch']}, peak "
              f"{r['peak_bytes'] / 2**20:.0f} MiB, above static "
              f"{r['above_static_bytes'] / 2**20:.0f} MiB{mfu}")
    for name, ratio in results.get("ratios", {}).items():
        print(f"{length} {name}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratio.items()))
for side, r in report.get("find_max_batch", {}).items():
    print(f"largest micro-batch at {r.get('max_length')}, {side}: {r.get('max_micro_batch')} "
          f"(stopped by {r.get('stopped_by', 'the budget')})")
steps = []
if "build_model_s" in report:
    steps.append({"name": "build model", "actual_s": round(report["build_model_s"], 1),
                  "status": "ok", "estimate_s": estimates.get("build model")})
for line in (out / "steps.tsv").read_text().splitlines():
    name, seconds, status = line.split("\t")
    steps.append({"name": name, "actual_s": int(seconds), "status": status,
                  "estimate_s": estimates.get(name)})
for name, processes in report.get("processes", {}).items():
    for p in processes:
        steps.append({"name": f"side {name}", "actual_s": round(p.get("wall_s", 0), 1),
                      "status": "ok" if p["ok"] else "failed",
                      "estimate_s": estimates.get(f"side {name}")})
(out / "steps.json").write_text(json.dumps(steps, indent=2))
print(f"{'step':<28}{'actual s':>9}{'estimate s':>11}  status")
for s in steps:
    estimate = "-" if s["estimate_s"] is None else f"{s['estimate_s']:.0f}"
    print(f"{s['name']:<28}{s['actual_s']:>9}{estimate:>11}  {s['status']}")
EOF
log "done in $(($(date +%s) - START)) s; tests $TESTS, benchmark $BENCH_STATUS, flex $FLEX;" \
    "files in $OUT"
if [[ $TESTS != 0 || $BENCH_STATUS != 0 ]]; then
    exit 1
fi
