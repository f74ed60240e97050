#!/usr/bin/env bash
# Creates .venv and installs dfkd with its pinned torch/torchvision (constraints.txt). Idempotent: a second
# run only checks that everything is installed. Used by both README commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[all,dev]"
