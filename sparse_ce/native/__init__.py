"""The fused sparse-attention op (``kernel_src/``) built for this machine's CPU on first use, no Hub needed.

Schlatt et al., ECIR 2024 left fused kernels for the asymmetric pattern as future work; ``kernel_src/`` holds one.
Installing sparse-ce makes its CPU build available: :func:`load_cpu_kernel` compiles it once into a cache keyed by
the source hash, the torch version and the CPU's instruction set, and imports it. Models loaded with remote code find
it through an optional import, so a machine without sparse-ce (or without a compiler) falls back to the PyTorch
``windowed`` backend with one logged line.
"""

from .build import build_cpu_kernel, cache_root, kernel_sources, load_cpu_kernel

__all__ = ["build_cpu_kernel", "cache_root", "kernel_sources", "load_cpu_kernel"]
