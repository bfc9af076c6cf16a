"""One vocabulary across the commands (issue 23, item 5): the option names every command spells the same way, and
the old spellings kept as aliases that print one deprecation line.

``--model`` (a folder or Hub id; a positional MODEL in ``index`` and ``analyze`` is the old spelling),
``--dtype`` (always the compute dtype; the dtype vectors are stored in is ``--storage-dtype``), ``--collections``,
``--limit-queries``, ``--depth`` (candidates re-ranked per query), ``--threads``, ``--data`` (read from the working
directory, default ``../shared/data``), ``--no-progress``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UsageError

DEFAULT_DATA = Path("../shared/data")
"""``--data``'s default in every command, relative to the working directory (the project root in the README)."""

DEFAULT_DEPTH = 100
"""``--depth``'s default in every command: the BM25 top-100 the paper re-ranks."""


def deprecation(parser_prog: str, old: str, new: str) -> None:
    print(f"{parser_prog}: {old} is deprecated; use {new}", file=sys.stderr)


class Renamed(argparse.Action):
    """``store`` under the new name; called by one of ``old`` it also prints one deprecation line."""

    def __init__(self, option_strings, dest, old=(), **kwargs):
        self.old = set(old)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.old:
            deprecation(parser.prog, option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


def add_renamed(parser, new: str, *old: str, **kwargs) -> argparse.Action:
    """``parser.add_argument(new, *old, ...)`` where the ``old`` spellings still work and say they are deprecated."""
    return parser.add_argument(new, *old, action=Renamed, old=old, **kwargs)


def add_model(parser, help: str, positional_alias: bool = False) -> None:
    """``--model`` (required); ``positional_alias`` also accepts the old positional MODEL, with a deprecation line
    (:func:`model_of` reconciles the two)."""
    if positional_alias:
        parser.add_argument("--model", help=help + " (required)")
        parser.add_argument("model_positional", nargs="?", metavar="MODEL", help="deprecated spelling of --model")
    else:
        parser.add_argument("--model", required=True, help=help)


def model_of(args: argparse.Namespace, prog: str) -> str:
    """The model of ``--model`` or of the deprecated positional MODEL (one deprecation line); both or neither is a
    :class:`UsageError`."""
    positional = getattr(args, "model_positional", None)
    if positional and args.model and positional != args.model:
        raise UsageError(f"--model {args.model} and a positional MODEL {positional}: give --model only")
    if positional:
        deprecation(prog, "a positional MODEL", "--model MODEL")
        args.model = positional
    if not args.model:
        raise UsageError("--model: required (a model folder or Hub id)")
    return args.model
