#!/usr/bin/env bash
# MixEncoder ("Once is Enough", Wang et al.) on two CPU cores: train k = 1, 2, 3 from all-MiniLM-L6-v2 with in-batch
# negatives + listwise distillation (TREC DL 21/22, the teacher of docs/training.md, held-out DL21 dev queries),
# then the Table 4 protocol with quality (docs/precompute.md). Finished models are kept; interrupted runs resume.
#
# Usage: bash experiments/precompute.sh [OUT]
#   env: STEPS_K1 (800), STEPS_K23 (300), LR (2e-5), THREADS (1), PYTHON, DATA
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/mix}
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data}
STEPS_K1=${STEPS_K1:-800} STEPS_K23=${STEPS_K23:-300} LR=${LR:-2e-5} THREADS=${THREADS:-1}

train() {  # train NAME K STEPS EVAL_STEPS
  local name=$1 k=$2 steps=$3 every=$4
  if [ -f "$OUT/$name/training.json" ]; then return; fi
  $PYTHON train_st.py --arch mixencoder --output "$OUT/$name" --k "$k" --loss listwise+mnrl --batch-size 4 \
    --lr "$LR" --max-steps "$steps" --eval-steps "$every" --save-steps 100 --resume --threads "$THREADS" --bf16 \
    --save-dtype float16 --data "$DATA"
}

train k1-full 1 "$STEPS_K1" 200
train k2-full 2 "$STEPS_K23" 250 &
train k3-full 3 "$STEPS_K23" 250
wait
# quality of the cross-encoders: Table 1's trained models (docs/training.md), not re-measured here
$PYTHON -m sparse_ce.cli bench --precomputed --mix-models "$OUT/k1-full" "$OUT/k2-full" "$OUT/k3-full" \
  --quality docs/precompute/quality.json --threads 2 --data "$DATA" --output-dir docs/precompute
