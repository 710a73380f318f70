#!/usr/bin/env bash
# Sets everything up and runs the main job on the embedded default (scikit-learn's digits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" scripts/digits_demo.py --out "${1:-out/digits}"
