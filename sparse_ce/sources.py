"""Where the conversions read their source checkpoints: a local folder or a Hub id, and the source's tokenizer.

Shared by ``sparse-ce convert`` (:mod:`sparse_ce.convert.command`) and ``--arch mixencoder``
(:mod:`sparse_ce.precompute.convert`); it imports neither, so the two never import each other for it.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase

HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model*.bin"]
"""What a Hub download fetches: configs, tokenizer files and PyTorch weights (no ONNX/OpenVINO/TF exports)."""


def resolve_source(src: str | Path) -> tuple[Path, str | None]:
    """Return the local folder of ``src`` and its Hub id (``None`` for a local folder).

    A Hub download honours ``HF_HUB_OFFLINE`` (then only the local cache is used) and fails fast with a clear error.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"src: {path} has no config.json")
        return path, None
    if path.exists():
        raise FileNotFoundError(f"src: {path} is a file; expected a model folder or a Hub id")
    try:
        folder = Path(snapshot_download(str(src), allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated repo, network error: all end the same way
        raise FileNotFoundError(
            f"src: {str(src)!r} is not a local folder and could not be fetched from the Hub "
            f"({type(exc).__name__}: {exc}). Pass a local folder, or unset HF_HUB_OFFLINE and check the network."
        ) from exc
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"src: Hub repository {src!r} has no config.json")
    return folder, str(src)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """Load the source tokenizer; the converted folder needs its [SEP] and [PAD] ids.

    A BERT config is passed so that transformers resolves the (BERT) tokenizer without executing, or prompting for,
    the remote code of a sparse-ce source folder.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, config=BertConfig())
    except (OSError, ValueError) as exc:
        raise ValueError(f"src: no usable tokenizer in {folder} ({exc}); the converted model needs one") from exc
    if tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"src: the tokenizer in {folder} has no [SEP] or [PAD] token")
    return tokenizer
