#!/usr/bin/env bash
# Sets everything up and runs the default test suite (CPU; GPU-marked and slow tests excluded), then
# prints its wall time and peak RSS; the exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
bash scripts/setup.sh
echo "test: setup took ${SECONDS} s" >&2
exec "${PYTHON:-python3}" scripts/timed.py "test (the suite, setup excluded)" -- \
    "${PYTHON:-python3}" -m pytest -m "not gpu and not slow" "$@"
