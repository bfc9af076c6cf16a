"""Build this environment's variant of the sparse_ce_kernels Hub kernel without Nix.

kernel-builder (``build.toml`` + ``flake.nix``) is the official way to build every variant for the Hub. This script
compiles the same sources with ``torch.utils.cpp_extension`` into the layout ``kernels`` loads::

    OUT/build/torch<major><minor>-<cxx11|cxx98>-<cpu|cu<ver>>-<arch>-linux/
        __init__.py  _ops.py  <namespace>.so  metadata.json

The op namespace ``_sparse_ce_kernels_<backend>_<hash>`` is unique per source content, so that two builds can be
loaded in one process. Usage::

    python kernel_src/build_local.py --out DIR [--cuda]

The compiled extension is imported into the building process (``cpp_extension.load``); run it in its own process
when the same process will later load the kernel through ``kernels``.

The nvcc flags of the CUDA variant are ``build.toml``'s ``cuda-flags`` plus the C++ standard of the running torch
(:func:`cuda_flags`); ``scripts/check_cuda.sh`` compiles with the same list (``--print-cuda-flags``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH_EXT = HERE / "torch-ext"
PACKAGE = TORCH_EXT / "sparse_ce_kernels"
KERNEL_NAME = "sparse-ce-kernels"
PYTHON_NAME = "sparse_ce_kernels"
CPU_SOURCES = [TORCH_EXT / "torch_binding.cpp", HERE / "cpu" / "sparse_attention_cpu.cpp"]
CPU_HEADERS = [HERE / "cpu" / "sparse_attention_cpu_impl.h"]
CUDA_SOURCES = [HERE / "cuda" / "sparse_attention.cu"]
HEADERS = [TORCH_EXT / "torch_binding.h", TORCH_EXT / "sparse_attention_checks.h"]
BUILD_TOML = HERE / "build.toml"
# no -march=native: the build must run on any x86-64 / aarch64 CPU. The ops need no pybind11: dropping
# torch/extension.h (which cpp_extension forces into <torch/torch.h>) keeps the build short.
CFLAGS = ["-O3", "-fopenmp", "-std=c++17", "-UTORCH_API_INCLUDE_EXTENSION_H"]


def source_files(cuda: bool) -> list[Path]:
    files = CPU_SOURCES + CPU_HEADERS + HEADERS + sorted(PACKAGE.glob("*.py")) + [Path(__file__).resolve()]
    if cuda:
        files += sorted((HERE / "cuda").glob("*")) + [BUILD_TOML]
    return files


def cxx_standard() -> str:
    """``c++20`` for torch >= 2.10 (its headers need it; torch's cpp_extension uses it), else ``c++17``."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return "c++20" if (major, minor) >= (2, 10) else "c++17"


def cuda_flags() -> list[str]:
    """The one nvcc recipe: ``build.toml``'s ``[kernel.sparse_attention_cuda] cuda-flags`` and ``-std=``."""
    text = BUILD_TOML.read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the list is one TOML array of plain strings
        match = re.search(r"^cuda-flags\s*=\s*\[(.*?)\]", text, re.M | re.S)
        flags = re.findall(r'"([^"]*)"', re.sub(r"#.*", "", match.group(1))) if match else None
    else:
        flags = tomllib.loads(text)["kernel"]["sparse_attention_cuda"].get("cuda-flags")
    if not flags:
        raise RuntimeError(f"{BUILD_TOML}: no cuda-flags in [kernel.sparse_attention_cuda]")
    return [*flags, f"-std={cxx_standard()}"]


def source_hash(cuda: bool = False) -> str:
    """Content hash of everything that goes into the build (sources, Python package, this script)."""
    digest = hashlib.sha256()
    for path in source_files(cuda):
        if path.is_file():
            digest.update(path.relative_to(HERE).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def variant_name(cuda: bool = False) -> str:
    """kernel-builder's variant name for the running torch, e.g. ``torch213-cxx11-cpu-x86_64-linux``."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    abi = "cxx11" if getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True) else "cxx98"
    if cuda:
        if torch.version.cuda is None:
            raise RuntimeError("--cuda needs a CUDA build of torch")
        backend = "cu" + "".join(torch.version.cuda.split(".")[:2])
    else:
        backend = "cpu"
    return f"torch{major}{minor}-{abi}-{backend}-{platform.machine()}-{sys.platform}"


def namespace(cuda: bool = False) -> str:
    return f"_{PYTHON_NAME}_{'cuda' if cuda else 'cpu'}_{source_hash(cuda)[:10]}"


def ops_py(ns: str) -> str:
    return (
        "import torch\n\n"
        f"from . import {ns}  # noqa: F401  (loads the library and registers its ops)\n\n"
        f"ops = torch.ops.{ns}\n\n\n"
        "def add_op_namespace_prefix(op_name: str) -> str:\n"
        '    """Prefix an op name with the namespace of this build."""\n'
        f'    return f"{ns}::{{op_name}}"\n'
    )


def build(out: Path, cuda: bool = False, verbose: bool = False) -> Path:
    """Compile and lay out the variant under ``out/build/<variant>``; returns that folder."""
    from torch.utils import cpp_extension

    ns = namespace(cuda)
    variant_dir = Path(out) / "build" / variant_name(cuda)
    sources = [str(p) for p in CPU_SOURCES]
    cflags = list(CFLAGS)
    kwargs = {}
    if cuda:
        sources += [str(p) for p in CUDA_SOURCES]
        cflags.append("-DSPARSE_CE_CUDA")
        kwargs["extra_cuda_cflags"] = cuda_flags()
    with tempfile.TemporaryDirectory(prefix="sparse-ce-build-") as tmp:
        module = cpp_extension.load(
            name=ns,
            sources=sources,
            extra_include_paths=[str(TORCH_EXT)],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=tmp,
            verbose=verbose,
            **kwargs,
        )
        library = Path(module.__file__)
        if variant_dir.exists():
            shutil.rmtree(variant_dir)
        variant_dir.mkdir(parents=True)
        shutil.copy2(library, variant_dir / library.name)
    for path in PACKAGE.glob("*.py"):
        if path.name != "_ops.py":
            shutil.copy2(path, variant_dir / path.name)
    (variant_dir / "_ops.py").write_text(ops_py(ns))
    metadata = {
        "id": ns,
        "name": KERNEL_NAME,
        "version": 1,
        "license": "Apache-2.0",
        "backend": {"type": "cuda" if cuda else "cpu"},
        "python-depends": [],
    }
    (variant_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return variant_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="kernel repository folder (build/<variant> goes in it)")
    parser.add_argument("--cuda", action="store_true", help="build the CUDA variant (needs nvcc and CUDA torch)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--print-cuda-flags", action="store_true", help="print the nvcc flags, one a line, and exit")
    args = parser.parse_args(argv)
    if args.print_cuda_flags:
        print("\n".join(cuda_flags()))
        return
    if args.out is None:
        parser.error("--out is required")
    print(build(args.out, cuda=args.cuda, verbose=args.verbose))


if __name__ == "__main__":
    main()
