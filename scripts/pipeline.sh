#!/usr/bin/env bash
# Runs the default offline pipeline (dvc.yaml + params.yaml) inside .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1
export PATH="$PWD/.venv/bin:$PATH"
dvc repro "$@"
