#!/usr/bin/env bash
# Both benchmarks and the CUDA tests on a GPU machine, in float32 and mixed precision (~3 min on an H100):
#   benchmarks/run_on_gpu.sh [OUT_DIR]      # writes OUT_DIR/*.json and *.log (default: output/gpu)
# Needs torch with CUDA, detectron2, fvcore and pycocotools importable, and this repo on PYTHONPATH (or
# installed). Each step has its own time limit, so that one that hangs does not take the others with it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-output/gpu}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, its output to the terminal and NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | grep -v -e 'FutureWarning' -e 'warnings.warn' | tee "$out/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]}"
}
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
step cuda_tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_nonlocal_block_cuda.py
for dtype in float32 bfloat16 float16; do
  # The four cases of the H100 table in the README (the two "-poolx" ones came later): within 90 s.
  step "block_$dtype" 90 "$PY" benchmarks/nonlocal_block.py --device cuda --dtype "$dtype" \
    --cases res4-sub res4-nosub res3-sub res3-nosub --repeats 5 --json "$out/block_$dtype.json"
done
step overhead_float32 75 "$PY" benchmarks/model_overhead.py --device cuda --warmup 3 --repeats 10 \
  --json "$out/overhead_float32.json"
step overhead_float16 75 "$PY" benchmarks/model_overhead.py --device cuda --amp float16 --warmup 3 \
  --repeats 10 --json "$out/overhead_float16.json"
step overhead_bfloat16 75 "$PY" benchmarks/model_overhead.py --device cuda --amp bfloat16 --warmup 3 \
  --repeats 10 --json "$out/overhead_bfloat16.json"
