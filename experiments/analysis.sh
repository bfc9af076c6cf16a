#!/usr/bin/env bash
# The matching-mechanism analysis of docs/analysis.md ("Understanding Matching Mechanisms in Cross-Encoders"):
# sparse-ce analyze ablate, heads and svd of one model on DL19 and DL20, with wall times in OUT/times.txt.
#
# Usage: bash experiments/analysis.sh MODEL OUT
#   env: THREADS (2), DEPTH (20), PER_CLASS (4), PYTHON (.venv/bin/python), DATA (../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1 OUT=$2
PYTHON=${PYTHON:-.venv/bin/python} DATA=${DATA:-../shared/data}
THREADS=${THREADS:-2} DEPTH=${DEPTH:-20} PER_CLASS=${PER_CLASS:-4}
mkdir -p "$OUT"
timed() {  # timed NAME command...: run it, append "NAME seconds" to OUT/times.txt
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  echo "$name $((SECONDS - start))" >> "$OUT/times.txt"
}
timed ablate $PYTHON -m sparse_ce.cli analyze ablate --model "$MODEL" --collections dl19 dl20 --data "$DATA" --depth "$DEPTH" \
  --threads "$THREADS" --output-dir "$OUT"
timed heads $PYTHON -m sparse_ce.cli analyze heads --model "$MODEL" --collections dl19 dl20 --data "$DATA" \
  --per-class "$PER_CLASS" --threads "$THREADS" --output-dir "$OUT"
timed svd $PYTHON -m sparse_ce.cli analyze svd --model "$MODEL" --heads "$OUT/heads.json" --output-dir "$OUT"
