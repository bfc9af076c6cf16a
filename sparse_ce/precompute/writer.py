"""Writing a MixEncoder candidate store: a corpus encoded once, shard by shard, resumable and split over processes.

Wang et al.: "Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling", Section 3.1: the
candidates' context embeddings are computed offline, once (the layout is described in :mod:`.store`). Documents go
to shards by their position in the deduplicated corpus stream, so a restarted run skips the shards that are complete
on disk, and process ``r`` of ``n`` (torchrun / accelerate) writes shards ``r, r + n, ...``. A shard is encoded in
the same batches whatever interrupted the run, so a resumed or sharded store equals an uninterrupted single-process
one tensor for tensor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .store import (
    MANIFEST,
    STORAGE_DTYPES,
    STORE_FORMAT,
    StoreManifest,
    model_hash,
    read_shard,
    shard_name,
    write_atomically,
)


def unique_documents(corpus: Iterable[tuple[str, str]], limit: int | None = None) -> Iterator[tuple[str, str]]:
    """``(docid, text)`` of the first occurrence of each doc id, in stream order; the first ``limit`` only."""
    seen: set[str] = set()
    for docid, text in corpus:
        if limit is not None and len(seen) >= limit:
            return
        if docid not in seen:
            seen.add(docid)
            yield docid, text


@dataclass
class WriteReport:
    """What one process did: documents in the store, shards in all, shards it encoded or found complete, seconds."""

    documents: int
    shards: int
    encoded_shards: int
    encoded_documents: int
    resumed_shards: int
    seconds: float

    @property
    def documents_per_second(self) -> float:
        return self.encoded_documents / max(self.seconds, 1e-9)


def write_store(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Iterable[tuple[str, str]],
    folder: str | Path,
    corpus_name: str = "",
    batch_size: int = 64,
    shard_size: int = 4096,
    dtype: str = "float32",
    limit: int | None = None,
    overwrite: bool = False,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> WriteReport:
    """Encode the documents of ``corpus`` (``(docid, text)`` pairs; repeated doc ids after the first skipped) into
    the store ``folder``, shard by shard; this process (``rank`` of ``world``) writes shards ``rank, rank + world,
    ...``, and rank 0 the manifest once its shards are done.

    Without ``overwrite`` a shard already complete on disk (same doc ids, model and dtype) is kept, and a partial
    one (from a run with another ``limit``) encoded again. ``on_shard(index)`` is called after each written shard.

    Raises:
        ValueError: a store or shard of another model, or a shard holding other documents (the corpus changed).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size: expected positive numbers, got {shard_size} and {batch_size}")
    weights = model_hash(model)
    if not overwrite and (folder / MANIFEST).is_file():
        StoreManifest.read(folder).check_model(model, folder, weights)
    start = time.perf_counter()
    report = WriteReport(documents=0, shards=0, encoded_shards=0, encoded_documents=0, resumed_shards=0, seconds=0)
    stream = unique_documents(corpus, limit)
    desc = f"indexing (process {rank} of {world})" if world > 1 else "indexing"
    with tqdm(unit="doc", desc=desc, disable=not progress) as bar:
        while chunk := list(islice(stream, shard_size)):
            number = report.shards
            report.shards += 1
            report.documents += len(chunk)
            if number % world != rank:  # another process's shard
                continue
            docids = [docid for docid, _ in chunk]
            path = folder / shard_name(number)
            if not overwrite and shard_is_complete(path, docids, weights, STORAGE_DTYPES[dtype]):
                report.resumed_shards += 1
                bar.update(len(chunk))
                continue
            context, lengths = encode_documents(model, tokenizer, [text for _, text in chunk], batch_size, bar)
            tensors = {"context": context.to(STORAGE_DTYPES[dtype]).contiguous(), "lengths": lengths}
            metadata = {"docids": json.dumps(docids), "model_hash": weights}
            write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
            report.encoded_shards += 1
            report.encoded_documents += len(chunk)
            if on_shard is not None:
                on_shard(number)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the manifest goes out once every process's shards are on disk
    if rank == 0:
        for stale in folder.glob("shard-*.safetensors"):  # from an earlier run over a longer corpus
            if int(stale.stem.removeprefix("shard-")) >= report.shards:
                stale.unlink()
        config = model.config
        StoreManifest(
            format=STORE_FORMAT, model_hash=weights, model_dtype=str(model.dtype).removeprefix("torch."),
            model_config=config.to_dict(), num_context=config.num_context, hidden_size=config.hidden_size,
            context_strategy=config.context_strategy, max_candidate_length=config.max_candidate_length, dtype=dtype,
            shard_size=shard_size, num_documents=report.documents, num_shards=report.shards, corpus=corpus_name,
        ).write(folder)
    report.seconds = time.perf_counter() - start
    return report


def shard_is_complete(path: Path, docids: list[str], weights: str, dtype: torch.dtype) -> bool:
    """Whether ``path`` holds exactly ``docids`` encoded by model ``weights`` and stored in ``dtype``; False for no
    shard, one of another dtype, or one written under another ``limit`` (its doc ids a prefix of ``docids`` or the
    other way round): those are encoded again.

    Raises:
        ValueError: a shard of another model, or holding other documents (the corpus changed).
    """
    if not path.is_file():
        return False
    stored, tensors = read_shard(path, weights)
    if stored == docids:
        return tensors["context"].dtype == dtype
    shorter = min(len(stored), len(docids))
    if stored[:shorter] == docids[:shorter]:
        return False  # written under another limit: encoded again
    raise ValueError(
        f"{path} holds other documents than the corpus at this position (the corpus changed?); pass overwrite "
        f"(--overwrite) to encode the store again"
    )


@torch.inference_mode()
def encode_documents(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int,
    bar: tqdm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context embeddings ``[n, k, hidden]`` (float32, CPU) of ``[CLS] d [SEP]`` rows cut to ``max_candidate_length``,
    and each document's token count before cutting; batches of similar length, the same batches for the same texts."""
    max_length = model.config.max_candidate_length
    tokens = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = torch.tensor([len(ids) for ids in tokens], dtype=torch.int32)
    order = torch.argsort(lengths, descending=True, stable=True)
    context = torch.empty(len(texts), model.config.num_context, model.config.hidden_size)
    was_training = model.training
    model.eval()
    try:
        for batch in order.split(batch_size):
            rows = [texts[i] for i in batch.tolist()]
            inputs = tokenizer(rows, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            inputs = inputs.to(model.device)
            context[batch] = model.encode_candidates(inputs["input_ids"], inputs["attention_mask"]).float().cpu()
            if bar is not None:
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return context, lengths
