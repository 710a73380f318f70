#!/usr/bin/env bash
# Sets everything up and runs the default test suite (CPU; GPU-marked and slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -m "not gpu and not slow" "$@"
