#!/usr/bin/env bash
# The GPU checks of the block in one run, under 5 minutes (each step has its own time limit, so that one
# that hangs does not take the others with it):
#   benchmarks/run_on_gpu.sh [OUT_DIR]      # writes OUT_DIR/*.json and *.log (default: output/gpu)
# 1. tests/test_nonlocal_block_cuda.py on the code as it is (every path of nl_detectron.pairwise, forced
#    and as the cost rule chooses; 16-bit autocast with logits beyond float16's range), with a JUnit XML;
# 2. benchmarks/nonlocal_block.py for the softmax modes in float32, bfloat16 and float16 (autocast), every
#    case of its default run; each JSON holds the card, CUDA and torch versions, and per case the path
#    the cost rule took and the SDPA kernels that ran ("sdpa_backend").
# 3. benchmarks/block_host_time.py in the three dtypes: the host's time per forward+backward at a tiny size,
#    what sets the wall time at res4 (about 20 s).
# PATHS="rule materialised unmaterialised" also runs step 2 with the cost rule's choice forced each way
# (--force-path; block_DTYPE_PATH.json), the A/B that the rule's CUDA branch stands on (about 1.5 more
# minutes per forced path).
# WITH_MODEL=1 also runs benchmarks/model_overhead.py in float32 and bfloat16 (about 2.5 more minutes).
# COMMIT=<sha> names the commit in environment.json where the checkout's .git is not the tree's (a copy).
# Needs torch with CUDA, detectron2, fvcore and pycocotools importable, and this repo on PYTHONPATH (or
# installed).
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
"$PY" - "$out/environment.json" <<'EOF'
import json, os, platform, subprocess, sys, torch
commit = os.environ.get("COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
info = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "torch": torch.__version__,
        "python": platform.python_version(), "commit": commit or "unknown"}
print(info)
json.dump(info, open(sys.argv[1], "w"), indent=2)
EOF
step cuda_tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_nonlocal_block_cuda.py \
  --junitxml="$out/cuda_tests.xml"
for path in ${PATHS:-rule}; do
  for dtype in float32 bfloat16 float16; do
    name=block_$dtype
    [ "$path" = rule ] || name+=_$path
    step "$name" 90 "$PY" benchmarks/nonlocal_block.py --device cuda --dtype "$dtype" \
      --modes embedded_gaussian gaussian --repeats 5 --force-path "$path" --json "$out/$name.json"
  done
done
for dtype in float32 bfloat16 float16; do
  step "host_time_$dtype" 30 "$PY" benchmarks/block_host_time.py --device cuda --dtype "$dtype" --rounds 7 \
    --calls 50 --json "$out/host_time_$dtype.json"
done
if [ "${WITH_MODEL:-0}" = 1 ]; then
  step overhead_float32 75 "$PY" benchmarks/model_overhead.py --device cuda --warmup 3 --repeats 10 \
    --json "$out/overhead_float32.json"
  step overhead_bfloat16 75 "$PY" benchmarks/model_overhead.py --device cuda --amp bfloat16 --warmup 3 \
    --repeats 10 --json "$out/overhead_bfloat16.json"
fi
