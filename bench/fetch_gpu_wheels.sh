#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels bench/gpu_check.sh installs on a GPU machine
# that has no internet. The GPU image (see bench/README.md) has torch, lightning, transformers,
# torchmetrics, accelerate, tokenizers, safetensors, pandas and pytest, but not these:
#   datasets (+ dill, multiprocess, fsspec, pyarrow: datasets 5.2 needs pyarrow >= 24), trl,
#   jsonargparse[signatures] (+ docstring-parser, typeshed-client).
# Versions are this repository's tested ones. flash-attn is not fetched: PyPI has no wheel of it,
# so the GPU check runs sdpa (and flex_attention) instead.
#
#   bench/fetch_gpu_wheels.sh [DEST]      # DEST default: wheels/ (git-ignored), about 56 MB
#
# Then carry wheels/ to the GPU machine with the checkout (it is git-ignored: copy it, or have
# whatever ships the work tree carry the ignored path `wheels`) and run bench/gpu_check.sh
# there; it installs from it with `pip install --no-index --find-links wheels/ ...`.
# GPU_PYTHON (default 3.12, the GPU image's Python) selects the wheels' Python version.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-wheels}
GPU_PYTHON=${GPU_PYTHON:-3.12}
PIP=${PIP:-python3 -m pip}
PACKAGES=(
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    fsspec==2026.9.0
    pyarrow==26.0.1
    jsonargparse==4.53.0
    docstring-parser==0.18.0
    typeshed-client==2.15.0
)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
mkdir -p "$DEST"
# --no-deps: exactly the list above (anything else the GPU image already has).
$PIP download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$GPU_PYTHON" "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"
echo "wheels in $DEST ($(du -sh "$DEST" | cut -f1)):"
ls "$DEST"
