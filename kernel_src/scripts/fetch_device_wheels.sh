#!/usr/bin/env bash
# Wheels a lent GPU machine lacks (its image: Python 3.12, torch 2.11+cu130, no network; see the device tool's
# KINDS.md), downloaded here into .whl/ (git-ignored) so that gpu_check.sh can install them there offline:
# kernels (the CUDA op loads through it), datasets and its dill/multiprocess (CrossEncoderTrainer), tomlkit (kernels).
# Run in the repository root before asking for a device; the run's `carry` names .whl.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl kernels==0.19.1 tomlkit==0.15.3 datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18
ls -la .whl
