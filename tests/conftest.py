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
def tiny_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tiny-tok"))
