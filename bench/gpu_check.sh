#!/usr/bin/env bash
# The GPU check, in one call on one H100/H200, within GPU_CHECK_BUDGET_S seconds (default 480):
#   1. the CUDA tests (pytest -m gpu tests/test_gpu.py: bf16 chunked log-probs against float32,
#      packing == padded with sdpa (and flash-attention when installed), shared prompt ==
#      unshared with sdpa and flex_attention, three bf16 FSDP2 steps of the 1B shape);
#   2. bench/train_vs_trl.py --size 1b at max lengths 1024 and 2048, sides ours, ours-unshared,
#      trl (live reference) and trl-precompute (precompute_ref_log_probs=True), then the largest
#      micro-batch at 2048 for ours and trl-precompute (TRL's best setting).
# Everything lands in $OUT (default ./gpu-check-out): environment.json, gpu-tests.log,
# train_vs_trl.json (written as it goes: a run cut by the budget keeps what it measured),
# train_vs_trl.log, summary.txt.
#
# Needs python3 with CUDA torch, lightning, transformers, torchmetrics, accelerate, tokenizers,
# safetensors and pytest (the GPU image has them), plus datasets, trl and
# jsonargparse[signatures]: when they are missing and a wheels/ folder exists, they are installed
# from it with `pip install --no-index --find-links wheels/` (bench/fetch_gpu_wheels.sh fetches
# that folder on a machine with pip access). No internet is used. PYTHON overrides the
# interpreter (default: .venv/bin/python when present, else python3).
#
#   bench/gpu_check.sh             # on the GPU machine
#   bench/gpu_check.sh --dry-run   # on CPU: every step above with tiny shapes (tests run it)
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
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
log() { echo "[gpu_check $(($(date +%s) - START)) s] $*" | tee -a "$OUT/summary.txt"; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: > "$OUT/summary.txt"

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
fi
if [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import torch; assert torch.cuda.is_available()"; then
    log "no CUDA device visible; use --dry-run on a CPU machine"
    exit 2
fi

# ---- 2. CUDA tests ---------------------------------------------------------------------------
if [[ $DRY_RUN == 1 ]]; then
    export TREG_GPU_DRY_RUN=1
fi
log "CUDA tests (budget left $(left) s)"
timeout "$((BUDGET / 2))" "$PY" -m pytest -q -rA -s -m gpu tests/test_gpu.py -p no:cacheprovider \
    > "$OUT/gpu-tests.log" 2>&1
TESTS=$?
tail -n 15 "$OUT/gpu-tests.log"
log "CUDA tests exit status $TESTS"

# ---- 3. against TRL --------------------------------------------------------------------------
SIDES=(ours ours-unshared trl trl-precompute)
if [[ $DRY_RUN == 1 ]]; then
    # In one process: the sides' code without four interpreter start-ups (make test's budget).
    BENCH=(--size tiny --max-length 32 --micro-batch 2 --warmup-steps 1 --steps 1 --in-process
           --max-batch-cap 1 --find-max-batch-sides ours trl-precompute)
else
    BENCH=(--size 1b --max-length 1024 2048 --warmup-steps 3 --steps 10 --timeout 240
           --min-batch 8 --max-batch-cap 128 --find-max-batch-sides ours trl-precompute)
fi
log "train_vs_trl.py ${BENCH[*]} (budget left $(left) s)"
timeout "$(left)" "$PY" bench/train_vs_trl.py "${BENCH[@]}" --sides "${SIDES[@]}" \
    --with-find-max-batch --out "$OUT/train_vs_trl.json" > "$OUT/train_vs_trl.log" 2>&1
BENCH_STATUS=$?
grep -v -i "warn" "$OUT/train_vs_trl.log" | tail -n 40
log "train_vs_trl.py exit status $BENCH_STATUS (124: stopped by the budget; partial JSON kept)"

# ---- summary -------------------------------------------------------------------------------
"$PY" - "$OUT/train_vs_trl.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError) as error:
    sys.exit(f"no benchmark JSON: {error}")
for length, results in report.get("runs", {}).items():
    for side, r in results.items():
        if side in ("ratios", "load_average"):
            continue
        if not r.get("ok"):
            print(f"{length} {side}: FAILED")
            continue
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(f"{length} {side}: {r['tokens_per_s']:.0f} tokens/s, peak "
              f"{r['peak_bytes'] / 2**20:.0f} MiB, above static "
              f"{r['above_static_bytes'] / 2**20:.0f} MiB{mfu}")
    for name, ratio in results.get("ratios", {}).items():
        print(f"{length} {name}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratio.items()))
for side, r in report.get("find_max_batch", {}).items():
    capped = " (cap reached)" if r.get("capped") else ""
    print(f"largest micro-batch at {r['max_length']}, {side}: {r['max_micro_batch']}{capped}")
EOF
log "done in $(($(date +%s) - START)) s; tests $TESTS, benchmark $BENCH_STATUS; files in $OUT"
if [[ $TESTS != 0 || $BENCH_STATUS != 0 ]]; then
    exit 1
fi
