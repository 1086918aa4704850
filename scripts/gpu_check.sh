#!/usr/bin/env bash
# On a machine with CUDA: the precision parity tests and the benchmark for fp32 and fp16,
# printed as one Markdown table (also in $OUT/result.md). Run from a checkout whose
# environment has the project installed (make install, or pip install -e '.[dev]').
#
#   scripts/gpu_check.sh                 # uses a random ViT-B-32 in /tmp
#   MODEL_DIR=/models/vit-b-32 OUT=gpu scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
MODEL_DIR=${MODEL_DIR:-/tmp/vit-b-32-random}
OUT=${OUT:-bench-results/gpu}

"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
[ -f "$MODEL_DIR/open_clip_config.json" ] || "$PY" -m app.tools.random_model "$MODEL_DIR"

echo "== parity against fp32 on the CPU (cuda fp32 >= 0.9999, cuda fp16 >= 0.999)"
"$PY" -m pytest tests/integration/test_precisions.py -m cuda -q -s -p no:cacheprovider

echo "== benchmark"
"$PY" -m app.bench --model "local-dir:$MODEL_DIR" --device cuda --precisions fp32,fp16 \
    --batch-sizes 1,8,32,64,128 --seconds 3 --out "$OUT"
