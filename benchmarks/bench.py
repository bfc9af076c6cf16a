"""The efficiency benchmark of Schlatt et al., ECIR 2024 (Table 3 protocol, Figure 2b), whole forward.

The same as ``sparse-ce bench`` (implementation: ``sparse_ce/bench*.py``); results and the command that produced them
are in ``docs/benchmarks.md``.

Usage: python benchmarks/bench.py [--kernel DIR] [--lengths 64 ... 4096] [--smoke] [--output-dir benchmarks/results]
"""

import sys

from sparse_ce.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
