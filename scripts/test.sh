#!/usr/bin/env bash
# Runs the whole test suite (slow end-to-end tests included) inside .venv. pytest's exit 5 ("no tests
# collected") is turned into a failure so an empty collection can never pass CI.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1
.venv/bin/python -m ruff check . || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
