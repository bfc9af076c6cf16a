import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model_folder, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny sparse (w=2) cross-encoder folder with tokenizer and remote code."""
    return make_model_folder(tmp_path_factory.mktemp("tiny-sparse"))


@pytest.fixture(scope="session")
def spread_model_dir(tmp_path_factory) -> Path:
    """A tiny sparse (w=2) cross-encoder whose scores spread over ~0.1 (initializer_range 0.2): with the default 0.02
    scores differ by ~2e-5 between documents, under the 1e-5 tolerances of score comparisons (issue 23)."""
    return make_model_folder(tmp_path_factory.mktemp("spread-sparse"), initializer_range=0.2)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tiny-tok"))
