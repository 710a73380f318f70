#!/usr/bin/env bash
# Sets everything up and runs the default test suite (CPU; GPU-marked and slow tests excluded), then
# prints its peak RSS and wall time; the exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py="${PYTHON:-python3}"
exec "$py" scripts/peak_rss.py "$py" -m pytest -m "not gpu and not slow" "$@"
