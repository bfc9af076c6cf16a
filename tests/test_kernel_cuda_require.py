"""SPARSE_CE_REQUIRE_CUDA=1 makes tests/test_kernel_cuda.py fail where it would skip (a GPU session must not pass
with zero coverage). Runs pytest on that file in a child process with the GPU hidden (CUDA_VISIBLE_DEVICES=""),
and with ``kernels`` hidden (a plugin sets ``sys.modules["kernels"] = None`` before the conftest imports anything);
each child stops at collection, before any build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cuda_tests(tmp_path, hide_kernels=False, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPARSE_CE_")}
    environ.update(CUDA_VISIBLE_DEVICES="", **env)
    plugins = []
    if hide_kernels:  # import kernels then raises ImportError, and find_spec says it is absent (transformers asks)
        (tmp_path / "hide_kernels.py").write_text('import sys\n\nsys.modules["kernels"] = None\n')
        environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), environ.get("PYTHONPATH", "")])
        plugins = ["-p", "hide_kernels"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugins, "tests/test_kernel_cuda.py"],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("hide_kernels, reason", [(False, "no CUDA device"), (True, "kernels package is missing")])
def test_require_cuda_turns_skips_into_failures(tmp_path, hide_kernels, reason):
    rc, text = run_cuda_tests(tmp_path, hide_kernels, SPARSE_CE_REQUIRE_CUDA="1")
    assert rc not in (0, 5), text  # 5: nothing collected
    assert f"SPARSE_CE_REQUIRE_CUDA=1: {'the ' if hide_kernels else ''}{reason}" in text, text
    assert " passed" not in text and " skipped" not in text, text


def test_require_cuda_refuses_the_dry_run(tmp_path):
    rc, text = run_cuda_tests(tmp_path, SPARSE_CE_REQUIRE_CUDA="1", SPARSE_CE_TEST_DEVICE="cpu")
    assert rc not in (0, 5) and "is a dry run, not the CUDA op" in text, text


def test_without_require_cuda_the_file_skips(tmp_path):
    rc, text = run_cuda_tests(tmp_path, hide_kernels=True)
    assert rc in (0, 5) and "1 skipped" in text and "failed" not in text, text  # 5: no test collected
