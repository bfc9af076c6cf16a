"""The ``sparse-ce`` command: one sub-command per tool module, each module owning its arguments."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "convert": ("sparse_ce.convert", "make a sparse cross-encoder Hub folder from a BERT checkpoint"),
    "rerank": ("sparse_ce.rerank", "re-rank a first-stage run and write a TREC run"),
    "bench": ("sparse_ce.bench", "time and memory of every attention path (Table 3 / Figure 2b protocol)"),
    "evaluate": ("sparse_ce.evaluate", "re-rank test collections with several systems and test their equivalence"),
}
"""Sub-command -> (module with ``add_arguments(parser)`` and ``run(args)``, help text)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-ce", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
        command.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(importlib.import_module(args.module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
