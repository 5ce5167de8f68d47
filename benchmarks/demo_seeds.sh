#!/usr/bin/env bash
# The demo's recipe (configs/quick/mask_rcnn_nl_R18_shapes.yaml) trained and COCO-evaluated once per seed:
# prints each run's wall time, seconds per iteration and box / mask AP, as docs/performance.md reports them.
#   benchmarks/demo_seeds.sh OUT_DIR SEED [SEED ...]        (extra KEY VALUE overrides: OPTS="...")
# Run it on an idle machine: each run is a whole `make demo` (about 7 minutes on an idle 2-core EPYC).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
mkdir -p "$out"
PY=${PY:-.venv/bin/python}
for seed in "$@"; do
    dir="$out/seed$seed"
    start=$(date +%s)
    # shellcheck disable=SC2086
    $PY tools/train_net.py --config-file configs/quick/mask_rcnn_nl_R18_shapes.yaml \
        SEED "$seed" OUTPUT_DIR "$dir" ${OPTS:-} > "$dir.log" 2>&1
    wall=$(( $(date +%s) - start ))
    speed=$(grep -o "Overall training speed.*" "$dir.log" || true)
    box=$(grep -A2 "copypaste: Task: bbox" "$dir.log" | tail -1 | sed 's/.*copypaste: //')
    mask=$(grep -A2 "copypaste: Task: segm" "$dir.log" | tail -1 | sed 's/.*copypaste: //')
    echo "seed $seed: wall ${wall}s; $speed; box AP,AP50,AP75,APs,APm,APl: $box; mask: $mask"
done
