"""A candidate store: every document of a corpus encoded once into its MixEncoder context embeddings.

Wang et al.: "Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling", Section 3.1: candidates
are encoded offline into ``k`` context embeddings ``E``; a query is encoded once and scored against the stored ``E``
by the light interaction layers alone. A store is a folder of safetensors shards (``shard-00000.safetensors``: tensor
``context`` ``[n, k, hidden]``, tensor ``lengths`` ``[n]`` (tokens of each document before truncation), the doc ids
and the model's weight hash in the shard's metadata) plus a ``store.json`` manifest (written last; see
:mod:`.writer`). A store is bound to the weights that wrote it by a hash of the model's state dict.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

STORE_FORMAT = 1
MANIFEST = "store.json"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""Dtypes a store may hold its context embeddings in (computed in the model's dtype, then cast)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict: each tensor's name, dtype, shape and float32 bytes, by sorted name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class StoreManifest:
    """``store.json``: what a store holds and which model wrote it."""

    format: int
    model_hash: str
    model_dtype: str
    model_config: dict
    num_context: int
    hidden_size: int
    context_strategy: str
    max_candidate_length: int
    dtype: str
    shard_size: int
    num_documents: int
    num_shards: int
    corpus: str

    @classmethod
    def read(cls, folder: Path) -> StoreManifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"store {folder}: no {MANIFEST} (not a candidate store, or never finished)")
        fields = json.loads(path.read_text(encoding="utf-8"))
        if fields.get("format") != STORE_FORMAT:
            raise ValueError(f"store {folder}: format {fields.get('format')!r}, this code reads format {STORE_FORMAT}")
        return cls(**fields)

    def write(self, folder: Path) -> None:
        write_atomically(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=2) + "\n"))

    def check_model(self, model: PreTrainedModel, folder: Path | str, weights: str | None = None) -> None:
        """Raise a ValueError unless ``model`` (whose :func:`model_hash` is ``weights``, computed when not given) wrote
        this store: same k, hidden size, context strategy and candidate length, and the same weights."""
        config = model.config
        for field in ("num_context", "hidden_size", "context_strategy", "max_candidate_length"):
            stored, model_value = getattr(self, field), getattr(config, field, None)
            if model_value != stored:
                raise ValueError(f"store {folder}: {field} is {stored!r}, the model's is {model_value!r}")
        weights = weights or model_hash(model)
        if weights != self.model_hash:
            raise ValueError(
                f"store {folder} was written by model {self.model_hash} ({self.model_dtype} weights), not this model "
                f"{weights} ({str(model.dtype).removeprefix('torch.')} weights)"
            )


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class CandidateStore:
    """A corpus' context embeddings, memory-mapped from a store folder (made by :func:`.writer.write_store`).

    Attributes:
        folder: The store folder.
        manifest: Its ``store.json``.
    """

    def __init__(
        self,
        folder: Path,
        manifest: StoreManifest,
        shards: list[dict[str, torch.Tensor]],
        index: dict[str, tuple[int, int]],
    ) -> None:
        self.folder, self.manifest, self.shards = folder, manifest, shards
        self.index = index  # docid -> (shard, row)

    @classmethod
    def open(cls, folder: str | Path, model: PreTrainedModel | None = None) -> CandidateStore:
        """Memory-map a complete store (checked against ``model`` when given, see :meth:`StoreManifest.check_model`).

        Raises:
            FileNotFoundError: no manifest, or shards missing (named).
            ValueError: a shard written by another model or holding another number of rows than its doc ids.
        """
        folder = Path(folder)
        manifest = StoreManifest.read(folder)
        if model is not None:
            manifest.check_model(model, folder)
        missing = [shard_name(i) for i in range(manifest.num_shards) if not (folder / shard_name(i)).is_file()]
        if missing:
            raise FileNotFoundError(
                f"store {folder} is incomplete: {len(missing)} of {manifest.num_shards} shards missing "
                f"({', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}); run `sparse-ce index` again to "
                "finish it"
            )
        shards, index = [], {}
        for number in range(manifest.num_shards):
            docids, tensors = read_shard(folder / shard_name(number), manifest.model_hash)
            shards.append(tensors)
            index.update((docid, (number, row)) for row, docid in enumerate(docids))
        if len(index) != manifest.num_documents:
            raise ValueError(f"store {folder}: {len(index)} distinct documents in the shards, the manifest says "
                             f"{manifest.num_documents}")
        return cls(folder, manifest, shards, index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, docid: object) -> bool:
        return docid in self.index

    def missing(self, docids: Iterable[str]) -> list[str]:
        """The doc ids of ``docids`` that are not in the store, in their order."""
        return [docid for docid in docids if docid not in self.index]

    def get(self, docids: Sequence[str], name: str = "context") -> torch.Tensor:
        """Rows of tensor ``name`` (``context``: ``[n, k, hidden]`` in the store's dtype; ``lengths``: ``[n]``).

        Raises:
            KeyError: naming the doc ids that are not in the store.
        """
        missing = self.missing(docids)
        if missing:
            raise KeyError(f"store {self.folder}: {len(missing)} documents not in the store, e.g. {missing[:5]}")
        places = torch.tensor([self.index[docid] for docid in docids], dtype=torch.long).reshape(-1, 2)
        first = self.shards[0][name]
        out = first.new_empty((len(docids), *first.shape[1:]))
        for number in places[:, 0].unique().tolist():
            chosen = (places[:, 0] == number).nonzero().squeeze(1)
            out[chosen] = self.shards[number][name][places[chosen, 1]]
        return out


def read_shard(path: Path, weights: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The doc ids and memory-mapped tensors of a shard written by the model with hash ``weights``."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # views of the memory-mapped file
    if metadata.get("model_hash") != weights:
        raise ValueError(f"{path} was written by model {metadata.get('model_hash')}, not the store's model {weights}")
    docids = json.loads(metadata["docids"])
    if tensors["context"].shape[0] != len(docids):
        raise ValueError(f"{path}: {tensors['context'].shape[0]} rows for {len(docids)} doc ids")
    return docids, tensors
