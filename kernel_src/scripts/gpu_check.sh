#!/usr/bin/env bash
# Everything a session with a lent GPU must check (issue 22), as two stages that each fit in five minutes:
#   a) build the CUDA op; its tests with SPARSE_CE_REQUIRE_CUDA=1 (a skip is a failure); the flex tests on CUDA
#      (q/k/v gradients against the dense backend, a short CrossEncoderTrainer run through `auto` = flex);
#   b) compute-sanitizer memcheck on one small forward + backward of the op (bench_op.py --smoke), the op-level
#      benchmark (bench_op.py: op vs bandwidth bound vs SDPA); then `sparse-ce bench`: bf16, MiniLM shape,
#      1 x {512, 2048, 4096} and 100 x 164 tokens, systems BERT SDPA, flex, windowed, kernel, auto, floor.
# Usage, in the repository root on the device (wheels from fetch_device_wheels.sh carried in .whl/):
#   bash kernel_src/scripts/gpu_check.sh a      # or b, or all; logs and the bench results go to $OUT (or gpu_check/)
# From the device tool: run(command="bash kernel_src/scripts/gpu_check.sh a", carry=[".whl"], timeout_s=330).
set -uo pipefail
stage="${1:-all}"
out="${OUT:-gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false SPARSE_CE_REQUIRE_CUDA=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
kernel_dir=/tmp/sparse-ce-cuda-kernel
status=0
parallel=()  # pytest-xdist is in the device image: the CPU references of test_kernel_cuda.py run on 8 workers
python3 -c 'import xdist' 2>/dev/null && parallel=(-n 8)

build_op() {  # once per machine: the CUDA variant (with its CPU twin, the reference) through build_local.py
  if [[ ! -d "$kernel_dir/build" ]]; then
    local start=$SECONDS
    timeout 200 python3 kernel_src/build_local.py --out "$kernel_dir" --cuda > "$out/build.log" 2>&1 \
      || { tail -n 40 "$out/build.log"; echo "gpu_check: building the CUDA op failed" >&2; return 1; }
    echo "built the CUDA op in $((SECONDS - start)) s"
  fi
  export SPARSE_CE_CUDA_KERNEL="$kernel_dir"
}

step() {  # name, seconds, command...: run with a time limit, log to $out/name.log, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [[ $rc -eq 0 ]] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c 'import torch, transformers, sentence_transformers as st; print("torch", torch.__version__, "transformers",
transformers.__version__, "sentence-transformers", st.__version__)' | tee -a "$out/device.txt"

if [[ "$stage" == a || "$stage" == all ]]; then
  build_op || exit 1
  step cuda-op 200 python3 -m pytest -x -q -p no:cacheprovider "${parallel[@]}" tests/test_kernel_cuda.py
  step flex-cuda 150 python3 -m pytest -x -q -p no:cacheprovider tests/test_attention_flex_cuda.py
fi

if [[ "$stage" == b || "$stage" == all ]]; then
  build_op || exit 1
  step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 python3 kernel_src/scripts/bench_op.py \
    --kernel "$kernel_dir" --smoke
  step bench-op 60 python3 kernel_src/scripts/bench_op.py --kernel "$kernel_dir" --reps 50
  step bench 240 python3 -c 'import sys; from sparse_ce.cli import main; sys.exit(main(sys.argv[1:]))' bench \
    --device cuda --dtype bfloat16 --lengths 512 2048 4096 --passages 100x164 --repeats 10 --min-repeats 5 \
    --warmup 2 --systems floor bert-sdpa sparse-w4:auto sparse-w4:flex sparse-w4:windowed sparse-w4:kernel \
    --kernel "$kernel_dir" --rank-model none --output-dir "$out/bench"
  [[ -f "$out/bench/results.md" ]] && cat "$out/bench/results.md"
fi
echo "gpu_check stage $stage: $([[ $status -eq 0 ]] && echo passed || echo FAILED)"
exit $status
