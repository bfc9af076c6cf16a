#!/usr/bin/env bash
# docs/analysis.md's measurements: the shipped model under both ablation modes (the 25 directions in all layers and
# every group in all / lower / upper layers), its matching heads and their ablation against random heads of the same
# layers, and a [CLS]-head w=4 model trained with the listwise recipe, analysed the same way (zero mode, groups).
#
# Usage: bash experiments/analysis_issue26.sh [OUT]   env: PYTHON, DATA, THREADS (1)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-analysis26}
PYTHON=${PYTHON:-.venv/bin/python} DATA=${DATA:-../shared/data} THREADS=${THREADS:-1}
M=models/sparse-ce-minilm-l6-w4
A=(--collections dl19 dl20 --data "$DATA")
analyze() { $PYTHON -m sparse_ce.cli analyze "$@"; }
analyze ablate --model $M "${A[@]}" --depth 20 --threads "$THREADS" --mode zero --sets directions-all groups --output-dir "$OUT/shipped-zero"
analyze ablate --model $M "${A[@]}" --depth 20 --threads "$THREADS" --mode renormalise --sets directions-all groups --output-dir "$OUT/shipped-renormalise"
analyze heads --model $M "${A[@]}" --threads "$THREADS" --output-dir "$OUT/shipped-heads"
analyze svd --model $M --heads "$OUT/shipped-heads/heads.json" --output-dir "$OUT/shipped-heads"
analyze ablate --model $M "${A[@]}" --depth 20 --threads "$THREADS" --heads 1.1 2.9 --random-heads 8 --seed 0 --output-dir "$OUT/shipped-head-ablation"
$PYTHON train_st.py --output "$OUT/cls-w4" --pattern sparse --window 4 --score-head cls --loss listwise --max-steps 500 \
  --lr 5e-5 --new-parts-lr 1e-3 --eval-steps 250 --save-steps 250 --resume --threads "$THREADS" --bf16 --save-dtype float16 --seed 0 --data "$DATA"
analyze heads --model "$OUT/cls-w4" "${A[@]}" --threads "$THREADS" --output-dir "$OUT/cls-heads"
analyze ablate --model "$OUT/cls-w4" "${A[@]}" --depth 20 --threads "$THREADS" --mode zero --sets groups --output-dir "$OUT/cls-zero"
