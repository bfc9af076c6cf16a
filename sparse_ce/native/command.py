"""``sparse-ce build-kernel``: compile the CPU attention kernel now (it is otherwise built on first use)."""

from __future__ import annotations

import argparse

from .build import build_cpu_kernel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the compiler may take (default 1800)")


def run(args: argparse.Namespace) -> int:
    print(build_cpu_kernel(timeout=args.timeout))
    return 0
