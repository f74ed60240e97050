#!/usr/bin/env bash
# dfkd augment on a lent GPU machine (no internet, no pip index): the tiny SD image-variation pipeline's throughput
# in fp32 / bf16 / fp16, the offline prior's, and the default pipeline's augment stage on CUDA.
#
# Carry: .device (wheelsA: diffusers, kornia, kornia_rs for Python 3.12; see train_prior.sh for how they are made),
# artifacts/teachers/lenet5.safetensors and artifacts/banks/deepinversion.h5 (from `dvc repro`). Results: $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/augment-check}
source benchmarks/device/_env.sh
python3 -c 'import dfkd_common.tvguard; from diffusers import StableDiffusionImageVariationPipeline; import stages.cli' || exit 3
start=$(date +%s)
python3 benchmarks/bench_variation_speed.py --device cuda --dtypes fp32,bf16,fp16 --batch 64 -k 4 --steps 25 \
    2>&1 | grep -v "Writing model shards" | tee "$OUT/speed.txt"
python3 benchmarks/bench_variation_speed.py --device cuda --dtypes fp32,bf16 --batch 64 -k 4 --steps 25 \
    --sample-size 64 2>&1 | grep -v "Writing model shards" | grep tiny | sed 's/^/[latent 64] /' | tee -a "$OUT/speed.txt"
echo "speed done at $(( $(date +%s) - start )) s"
python3 -m stages.cli augment --name deepinversion --device cuda --teacher artifacts/teachers/lenet5.safetensors \
    --bank artifacts/banks/deepinversion.h5 --model priors/offline-pool-32x1 --out /tmp/aug.h5 \
    --metrics "$OUT/augment_prior_cuda.json" 2>&1 | tail -n 3 | tee "$OUT/augment_prior_cuda.txt"
python3 benchmarks/bench_augment.py --device cuda --sources 2048 -k 2 --bank artifacts/banks/deepinversion.h5 2>&1 | tee "$OUT/quality_2048.txt"
echo "total $(( $(date +%s) - start )) s"
