"""What produced a saved run or cache: a model identified by its content, and the settings that change its scores.

A run or cache named by a model's path or name alone comes back stale when the folder's weights change or another
model is evaluated under the same name (issue 23). Here a model is resolved once (a local folder, or a Hub id's
cached snapshot) and identified by a SHA-256 of its files, and a saved result carries a manifest of everything that
made it; a result is reused only when its manifest equals the one requested.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SKIPPED_SUFFIXES = (".md", ".tmp", ".lock")
"""Files of a model folder that do not change its outputs (model cards, partial writes)."""


class ModelNotFound(ValueError):
    """A model that is neither a local model folder nor a Hub id that resolves here."""


def looks_local(model: str | Path) -> bool:
    """Whether ``model`` names a local folder rather than a Hub id (``org/name``): it exists, starts like a path
    (``.``, ``/``, ``~``) or has no single slash."""
    text = str(model)
    return Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") != 1


def resolve_model(model: str | Path) -> Path | str:
    """The local folder of ``model``, or for a Hub id its cached snapshot folder (or the id itself when only the Hub
    knows it: online, not cached).

    Raises:
        ModelNotFound: for a path that does not exist or holds no ``config.json`` / ``modules.json``, or a Hub id
            that is neither cached nor found on the Hub.
    """
    text = str(model)
    path = Path(text).expanduser()
    if looks_local(text):
        if not path.is_dir():
            raise ModelNotFound(f"{text}: no such folder")
        if not ((path / "config.json").is_file() or (path / "modules.json").is_file()):
            raise ModelNotFound(f"{text}: not a model folder (no config.json)")
        return path.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True, allow_patterns=["*.json"]))
    except Exception:  # noqa: BLE001 - not cached (or offline): ask the Hub below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise ModelNotFound(f"{text}: not a local folder, and not in the Hub cache (HF_HUB_OFFLINE is set)")
    from huggingface_hub import model_info

    try:
        model_info(text)
    except Exception as error:  # noqa: BLE001 - any failure means: cannot be loaded
        raise ModelNotFound(f"{text}: not a local folder, and not found on the Hub ({type(error).__name__})") from None
    return text


def model_digest(model: str | Path) -> str:
    """SHA-256 (hex) over the files that define ``model``: a resolved folder's top-level files except model cards,
    plus the module folders a sentence-transformers ``modules.json`` names; for a Hub id not cached, ``hub:`` and
    the id's current commit."""
    resolved = resolve_model(model)
    if isinstance(resolved, str):
        from huggingface_hub import model_info

        return f"hub:{model_info(resolved).sha}"
    files = _model_files(resolved)
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest(resolved, stamp)


def _model_files(folder: Path) -> list[Path]:
    folders = [folder]
    modules = folder / "modules.json"
    if modules.is_file():
        folders += [folder / m["path"] for m in json.loads(modules.read_text()) if m.get("path")]
    return sorted(f for d in folders if d.is_dir() for f in d.iterdir()
                  if f.is_file() and not f.name.endswith(SKIPPED_SUFFIXES))


@functools.lru_cache(maxsize=64)
def _digest(folder: Path, stamp: tuple) -> str:  # stamp: (file, size, mtime) of each file, so an edit re-hashes
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        path = Path(name)
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def package_version() -> str:
    try:
        return importlib.metadata.version("sparse-ce")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def manifest_path(result: Path) -> Path:
    """The manifest beside a saved result: ``x.run`` -> ``x.run.json``."""
    return result.with_name(result.name + ".json")


def matching_result(result: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``result`` exists with a manifest equal to ``manifest``; a mismatch is logged in one line naming the
    fields that differ."""
    if not result.is_file():
        return False
    try:
        saved = json.loads(manifest_path(result).read_text())
    except (OSError, ValueError):
        logger.info("%s: no manifest of what produced it; recomputing", result)
        return False
    differing = sorted(k for k in manifest.keys() | saved.keys() if manifest.get(k) != saved.get(k))
    if differing:
        logger.info("%s was produced by another setting (%s differ); recomputing", result, ", ".join(differing))
        return False
    return True


def write_manifest(result: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest of a result just written (after it, so an interrupted write leaves no manifest)."""
    manifest_path(result).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def forget(result: Path) -> None:
    """Remove a result's manifest before the result is recomputed (an interrupted recomputation is then no match)."""
    manifest_path(result).unlink(missing_ok=True)
