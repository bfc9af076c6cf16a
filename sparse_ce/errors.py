"""The one exception class of a usage error, in a module of its own so that it is one class however the command
line is entered: ``sparse-ce``, ``python -m sparse_ce`` or ``python -m sparse_ce.cli`` (run as ``__main__``, cli.py
is a second module object; a class defined there would not be the one the sub-commands raise)."""


class UsageError(Exception):
    """A bad argument or input file: printed as one line naming it (no traceback), exit status 2."""


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (``--threads``, ``--batch-tokens``, ``--depth`` ...)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def run_tag(text: str) -> str:
    """An argparse type: a TREC run tag, the sixth field of a run line (non-empty, no whitespace)."""
    import argparse

    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"a run tag is one word (no spaces: it is a field of the run line), got {text!r}")
    return text


def check_output(path, label: str, folder: bool = False) -> None:
    """Refuse an output location the command could not write, as a usage error, before any work: a file that is a
    folder (or, with ``folder=True``, a folder that is a file), or one whose nearest existing folder is a file or
    takes no new file (probed with a temporary file, removed at once; permission bits alone say yes to root).
    Nothing else is created: the command makes the missing folders when it writes."""
    import tempfile
    from pathlib import Path

    path = Path(path).expanduser()
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"{label} {path}: is a {'file' if folder else 'folder'}; expected a {kind}")
    existing = path if folder else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{label} {path}: {existing} is a file, so the {kind} cannot be created")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f"{label} {path}: cannot write in {existing} ({error.strerror or error})") from None


def require(module: str, extra: str, command: str) -> None:
    """Refuse to start ``command`` when an optional dependency is missing, naming the extra that installs it (a
    usage error before any work, never an ImportError after it)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{command} needs {module}, which is not installed: pip install 'sparse-ce[{extra}]'")
