"""One nvcc recipe for the CUDA op: build.toml's cuda-flags, used by build_local.py --cuda and scripts/check_cuda.sh.

No GPU or CUDA torch is needed: check_cuda.sh runs with a stand-in nvcc that records its arguments, and
build_local.build(cuda=True) with a stand-in cpp_extension.load.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
KERNEL_SRC = Path(__file__).resolve().parents[1] / "kernel_src"


@pytest.fixture(scope="module")
def build_local():
    spec = importlib.util.spec_from_file_location("build_local_under_test", KERNEL_SRC / "build_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toml_flags():
    config = tomllib.loads((KERNEL_SRC / "build.toml").read_text())
    return config["kernel"]["sparse_attention_cuda"]["cuda-flags"]


def test_recipe_is_build_toml_plus_standard_without_fast_math(build_local):
    flags = build_local.cuda_flags()
    assert flags[:-1] == toml_flags() and flags[-1] == f"-std={build_local.cxx_standard()}"
    assert not any("fast_math" in f or "fast-math" in f or f.startswith("--ftz=true") for f in flags)
    printed = subprocess.run([sys.executable, str(KERNEL_SRC / "build_local.py"), "--print-cuda-flags"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert printed == flags


def test_recipe_without_tomllib(build_local, monkeypatch):
    """Python 3.10 has no tomllib: the fallback parser reads the same list."""
    monkeypatch.setitem(sys.modules, "tomllib", None)
    assert build_local.cuda_flags()[:-1] == toml_flags()


def test_check_cuda_compiles_with_the_recipe(build_local, tmp_path):
    log = tmp_path / "nvcc.log"
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {log}\necho "---" >> {log}\n')
    nvcc.chmod(0o755)
    env = dict(os.environ, NVCC=str(nvcc), PYTHON=sys.executable, ARCHS="80 90")
    result = subprocess.run(["bash", str(KERNEL_SRC / "scripts" / "check_cuda.sh")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [c.split("\n") for c in log.read_text().strip("\n-").split("\n---\n") if "-c" in c.split("\n")]
    assert len(calls) == 2  # one compile per architecture
    for args, arch in zip(calls, ("80", "90")):
        assert args[: len(build_local.cuda_flags())] == build_local.cuda_flags()
        assert f"arch=compute_{arch},code=sm_{arch}" in args and "all-warnings" in args
        assert args[args.index("-c") + 1].endswith("cuda/sparse_attention.cu")


def test_build_local_cuda_passes_the_recipe(build_local, monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    def load(**kwargs):
        seen.update(kwargs)
        raise Stop

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.8")
    with pytest.raises(Stop):
        build_local.build(tmp_path, cuda=True)
    assert seen["extra_cuda_cflags"] == build_local.cuda_flags()
    assert any(s.endswith("sparse_attention.cu") for s in seen["sources"])
    # the recipe is part of the CUDA build's content hash
    assert KERNEL_SRC / "build.toml" in build_local.source_files(cuda=True)
