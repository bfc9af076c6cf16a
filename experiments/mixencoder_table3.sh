#!/usr/bin/env bash
# MixEncoder ("Once is Enough", Wang et al.) with the authors' interaction block on two CPU cores: k=1 C (the default),
# Table 3's ablations (without H, without E), S vs C at k = 1 and 2, all from all-MiniLM-L6-v2 with the recipe of
# docs/precompute.md (listwise + in-batch negatives, TREC DL 21/22, 20 held-out DL21 dev queries; never DL19/DL20).
# Finished models are kept; interrupted runs resume from their checkpoints. Quality: experiments/mixencoder_quality.py.
#
# Usage: bash experiments/mixencoder_table3.sh [OUT] [NAME ...]   (names: k1-C k1-C-noH k1-C-noE k1-S k2-C k2-S)
#   env: STEPS (250), LR (2e-5), NEW_LR (1e-3: the zero-initialised blends), THREADS (1), PYTHON, DATA
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/mix26}; shift || true
NAMES=${*:-k1-C k1-C-noH k1-C-noE k1-S k2-C k2-S}
PYTHON=${PYTHON:-.venv/bin/python} DATA=${DATA:-../shared/data}
STEPS=${STEPS:-250} LR=${LR:-2e-5} NEW_LR=${NEW_LR:-1e-3} THREADS=${THREADS:-1}

options() {  # the MixEncoder options of a run name
  case $1 in
    k1-C) echo "--k 1 --strategy C" ;;
    k1-C-noH) echo "--k 1 --strategy C --ablation without_H" ;;
    k1-C-noE) echo "--k 1 --strategy C --ablation without_E" ;;
    k1-S) echo "--k 1 --strategy S" ;;
    k2-C) echo "--k 2 --strategy C" ;;
    k2-S) echo "--k 2 --strategy S" ;;
    *) echo "unknown run name $1" >&2; exit 2 ;;
  esac
}

for name in $NAMES; do
  if [ -f "$OUT/$name/training.json" ]; then continue; fi
  # shellcheck disable=SC2046
  $PYTHON train_st.py --arch mixencoder --output "$OUT/$name" $(options "$name") --loss listwise+mnrl --batch-size 4 \
    --lr "$LR" --new-parts-lr "$NEW_LR" --max-steps "$STEPS" --eval-steps 125 --save-steps 125 --dev-depths 100 \
    --resume --threads "$THREADS" --bf16 --save-dtype float16 --data "$DATA"
done
