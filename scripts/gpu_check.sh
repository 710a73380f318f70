#!/usr/bin/env bash
# One prepared GPU run: the GPU-marked tests, then the GPU benchmark (JSON). Writes under ${OUT:-gpu_out}.
# Usage (on a machine with CUDA torch + triton): bash scripts/gpu_check.sh
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 GRASS_OPS_GPU_TESTS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
for dtype in float32 bfloat16; do
  python scripts/bench_ops.py --device cuda --dtype "$dtype" --only sjlt --batch 4096 --max-dense-gib 16 \
    --out "$out/bench_sjlt_b4096_$dtype.json" 2>>"$out/bench.log" >/dev/null
  python scripts/bench_ops.py --device cuda --dtype "$dtype" --only sjlt --batch 64 --max-dense-gib 16 \
    --out "$out/bench_sjlt_b64_$dtype.json" 2>>"$out/bench.log" >/dev/null
done
python scripts/bench_ops.py --device cuda --dtype bfloat16 --only factgrass --llama-tokens 7168 \
  --out "$out/bench_factgrass_bf16.json" 2>>"$out/bench.log" >/dev/null
timeout 300 python -m attribution.cli bench --models llama3-8b-random gpt2-random --device cuda --dtype bfloat16 \
  --batch-size 7 --seq-len 1024 --ks 256 1024 4096 --out "$out/bench_llm_bf16.json" 2>>"$out/bench.log" >/dev/null \
  || echo "llm bench failed or timed out (see bench.log)"
echo "gpu tests exit code: $tests_rc"
exit "$tests_rc"
