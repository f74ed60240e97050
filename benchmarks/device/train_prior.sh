#!/usr/bin/env bash
# Train the offline diffusion prior of `dfkd augment` on a lent GPU machine (no internet, no pip index).
#
# Here, first: mkdir -p .device && pip download --no-deps --python-version 3.12 --only-binary=:all: \
#   --platform manylinux2014_x86_64 --platform any -d .device/wheelsA diffusers==0.42.1 kornia==0.9.0 kornia_rs==0.2.0
# (and .device/wheelsB: huggingface_hub, transformers, tokenizers, safetensors, hf-xet, regex, httpx2, httpcore2,
# anyio, truststore, idna, h11: used only if the machine's own huggingface_hub is too old for diffusers).
# Then run this script there with .device carried; the trained priors come back under $OUT.
# It builds the wild pool from params.yaml (nothing of MNIST in it) and trains two sizes side by side.
set -uo pipefail
OUT=${OUT:-/tmp/prior-out}
MINUTES=${MINUTES:-4}
mkdir -p "$OUT"
# (no exec > >(tee ...): a bare `wait` would also wait for the tee and never return)
python3 -V
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, huggingface_hub as h; print('torch', torch.__version__, 'transformers', transformers.__version__, 'hub', h.__version__)"
unwheel() { python3 -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$@"; }
unwheel /tmp/extA .device/wheelsA/*.whl
export PYTHONPATH=/tmp/extA:$PWD HF_HUB_OFFLINE=1
check='import dfkd_common.tvguard; from diffusers import UNet2DModel, DDPMPipeline; import stages.cli'
if ! python3 -c "$check"; then
    echo "the machine's hub/transformers do not fit diffusers 0.42: using the carried set"
    unwheel /tmp/extB .device/wheelsB/*.whl
    export PYTHONPATH=/tmp/extA:/tmp/extB:$PWD
    python3 -c "$check" || exit 3
fi
start=$(date +%s)
python3 -m stages.cli pool build --out /tmp/pool.h5 || exit 4
echo "pool built in $(( $(date +%s) - start )) s"
python3 -m stages.cli prior train --pool /tmp/pool.h5 --out "$OUT/prior-small" --device cuda \
    --set minutes="$MINUTES" > "$OUT/small.log" 2>&1 &
pids=($!)
python3 -m stages.cli prior train --pool /tmp/pool.h5 --out "$OUT/prior-large" --device cuda \
    --set minutes="$MINUTES" --set 'widths=[48,96,96]' --set lr=0.0005 > "$OUT/large.log" 2>&1 &
pids+=($!)
wait "${pids[@]}"
tail -n 3 "$OUT/small.log" "$OUT/large.log"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
echo "total $(( $(date +%s) - start )) s"
