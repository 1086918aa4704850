#!/usr/bin/env bash
# On a machine with CUDA: the precision parity tests, the benchmark for fp32 and fp16, and
# the service under load against the in-process fp16 ceiling. Figures land in $OUT
# (result.md, result.json, throughput.png from the benchmark; load.md, load.json from the
# load tool). Run from a checkout whose environment has the project installed (make
# install, or pip install -e '.[dev]').
#
#   scripts/gpu_check.sh                 # uses a random ViT-B-32 in /tmp
#   MODEL_DIR=/models/vit-b-32 OUT=gpu LOAD_SECONDS=20 scripts/gpu_check.sh
#   STEPS=load scripts/gpu_check.sh      # any of: parity bench load
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
MODEL_DIR=${MODEL_DIR:-/tmp/vit-b-32-random}
OUT=${OUT:-bench-results/gpu}
LOAD_SECONDS=${LOAD_SECONDS:-8}
STEPS=${STEPS:-parity bench load}
CLIENT_PROCESSES=${CLIENT_PROCESSES:-4}
mkdir -p "$OUT"
failed=0

"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ -f "$MODEL_DIR/open_clip_config.json" ] || "$PY" -m app.tools.random_model "$MODEL_DIR" || exit 1

# Each step runs even if one before it failed, so one call on a borrowed GPU reports all.
if [[ " $STEPS " == *" parity "* ]]; then
    echo "== parity against fp32 on the CPU (cuda fp32 >= 0.99999, cuda fp16 >= 0.999)"
    "$PY" -m pytest tests/integration/test_precisions.py -m cuda -q -s -p no:cacheprovider || failed=1
fi

if [[ " $STEPS " == *" bench "* ]]; then
    echo "== benchmark (in-process, no HTTP)"
    "$PY" -m app.bench --model "local-dir:$MODEL_DIR" --device cuda --precisions fp32,fp16 \
        --batch-sizes 1,8,32,64,128 --seconds 3 --out "$OUT" || failed=1
fi

if [[ " $STEPS " == *" load "* ]]; then
    # Twice: images prepared in decode processes (the default on a GPU host with 8+
    # cores), then in the decode threads alone, against the same in-process ceiling.
    echo "== the service under load: /embed/batch (32 crops) and /embed, fp16, vs the ceiling"
    "$PY" -m load_tests.concurrency --model-dir "$MODEL_DIR" --precision fp16 \
        --endpoints batch,embed --clients 1,16,32 --batch-images 32 --seconds "$LOAD_SECONDS" \
        --client-processes "$CLIENT_PROCESSES" \
        --json "$OUT/load.json" | tee "$OUT/load.md" || failed=1
    echo "== the same with threads only (CLIP_DECODE_PROCESSES=0), no ceiling"
    CLIP_DECODE_PROCESSES=0 "$PY" -m load_tests.concurrency --model-dir "$MODEL_DIR" \
        --precision fp16 --endpoints batch,embed --clients 1,16,32 --batch-images 32 \
        --seconds "$LOAD_SECONDS" --no-ceiling --client-processes "$CLIENT_PROCESSES" \
        --json "$OUT/load-threads.json" \
        | tee "$OUT/load-threads.md" || failed=1
fi
exit $failed
