# Template: kernel_src/build_local.py (and kernel-builder) rewrite this file with the unique op namespace of the build,
# e.g. `_sparse_ce_kernels_cpu_1a2b3c4`, and import the extension of that name so that its ops are registered.
import torch

from . import _sparse_ce_kernels_dev  # noqa: F401  (replaced at build time)

ops = torch.ops._sparse_ce_kernels_dev


def add_op_namespace_prefix(op_name: str) -> str:
    """Prefix an op name with the namespace of this build."""
    return f"_sparse_ce_kernels_dev::{op_name}"
