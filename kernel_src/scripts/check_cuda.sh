#!/usr/bin/env bash
# Compile-only check of the CUDA backend (no GPU needed): builds kernel_src/cuda/*.cu for sm_80 and sm_90 against
# the headers of the active torch and fails on any error or warning.
#
#   bash kernel_src/scripts/check_cuda.sh            # python from PATH
#   PYTHON=/path/to/python NVCC=/path/to/nvcc bash kernel_src/scripts/check_cuda.sh
#   ARCHS="80 90" (default), EXTRA_NVCC_FLAGS="..." optional.
# The flags are the build's recipe (build.toml's cuda-flags and the C++ standard of this torch, printed by
# build_local.py --print-cuda-flags) plus what a torch extension build adds itself (-fPIC, the C++ ABI define),
# with warnings as errors.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src_dir="$(cd "$here/../cuda" && pwd)"
PYTHON="${PYTHON:-python}"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
ARCHS="${ARCHS:-80 90}"

if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda.sh: nvcc not found (set NVCC=...)" >&2
  exit 2
fi

mapfile -t torch_includes < <("$PYTHON" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
abi="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
mapfile -t recipe < <("$PYTHON" "$here/../build_local.py" --print-cuda-flags)
if [[ ${#recipe[@]} -eq 0 ]]; then
  echo "check_cuda.sh: build_local.py --print-cuda-flags printed nothing" >&2
  exit 2
fi
include_flags=()
for dir in "${torch_includes[@]}"; do
  include_flags+=("-I$dir")
done
py_include="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
include_flags+=("-I$py_include")

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

status=0
shopt -s nullglob
sources=("$src_dir"/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda.sh: no .cu files in $src_dir" >&2
  exit 2
fi
echo "nvcc: $("$NVCC" --version | tail -n 1)"
echo "torch: $("$PYTHON" -c 'import torch; print(torch.__version__)') (cxx11 abi $abi)"
echo "recipe: ${recipe[*]}"
for src in "${sources[@]}"; do
  for arch in $ARCHS; do
    log="$tmp/$(basename "$src").sm_$arch.log"
    start=$(date +%s.%N)
    set +e
    "$NVCC" "${recipe[@]}" "-D_GLIBCXX_USE_CXX11_ABI=$abi" -Xcompiler -fPIC -Werror all-warnings \
      -gencode "arch=compute_$arch,code=sm_$arch" \
      "${include_flags[@]}" ${EXTRA_NVCC_FLAGS:-} \
      -c "$src" -o "$tmp/$(basename "$src").sm_$arch.o" >"$log" 2>&1
    rc=$?
    set -e
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    if [[ $rc -ne 0 ]]; then
      echo "FAIL $(basename "$src") sm_$arch (${secs}s)"
      cat "$log"
      status=1
    else
      echo "ok   $(basename "$src") sm_$arch (${secs}s)"
      if [[ -s "$log" ]]; then
        cat "$log"
      fi
    fi
  done
done
exit $status
