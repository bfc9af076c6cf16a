"""``sparse-ce index MODEL --corpus FILE --output DIR``: encode a corpus once into a MixEncoder candidate store.

Wang et al.: "Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling", Section 3.1: the
candidates' context embeddings are computed offline, once. The corpus is a TREC DL JSON first stage (its hits'
passages), a BEIR jsonl, TSV or TREC ``<DOC>`` file, or ``irds:<id>`` (ir_datasets, online). An interrupted run is
resumed by running the same command again; under ``torchrun`` / ``accelerate launch`` each process writes its share
of the shards (see :mod:`sparse_ce.precompute.store`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path

import ftfy
from transformers import AutoModelForSequenceClassification

from ..cli import UsageError
from ..data import iter_corpus, open_text, read_dl_json
from ..rank.scoring import load_tokenizer
from ..rank.shards import process_group
from ..runtime import resolve_device, set_threads
from ..errors import check_output, positive_int
from ..options import add_model, add_renamed, model_of
from .ranker import MIXENCODER_TYPE
from .store import STORAGE_DTYPES
from .writer import write_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``index`` options to ``parser``."""
    add_model(parser, "MixEncoder folder or Hub id", positional_alias=True)
    parser.add_argument("--corpus", required=True, help="TREC DL JSON first stage, BEIR jsonl, TSV docid<TAB>text, "
                        "TREC <DOC> file (.gz allowed) or irds:<ir_datasets id>")
    parser.add_argument("--output", required=True, help="store folder (an incomplete store there is resumed)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="documents per forward (default: 64)")
    parser.add_argument("--shard-size", type=positive_int, default=4096, help="documents per shard file (default: 4096)")
    add_renamed(parser, "--storage-dtype", "--dtype", dest="storage_dtype", choices=sorted(STORAGE_DTYPES),
                default="float32", help="dtype the context embeddings are stored in (computed in float32; default: "
                "float32; --dtype is its deprecated spelling: --dtype is the compute dtype elsewhere)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores this process may use)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    add_renamed(parser, "--limit-documents", "--limit", dest="limit_documents", type=positive_int, metavar="N",
                help="the first N distinct documents only (smoke tests; --limit is its deprecated spelling)")
    parser.add_argument("--fix-text", action=argparse.BooleanOptionalAction,
                        help="repair mojibake with ftfy (default: on for TREC DL JSON, as rerank --dl-json does)")
    parser.add_argument("--overwrite", action="store_true", help="encode every shard again instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def corpus_documents(source: str, fix_text: bool | None) -> tuple[Iterable[tuple[str, str]], str]:
    """The ``(docid, text)`` stream of ``--corpus`` and a description of it for the manifest.

    Raises:
        UsageError: a missing file, an unreadable DL JSON file, or ``irds:`` without ir_datasets.
    """
    if source.startswith("irds:"):
        try:
            import ir_datasets
        except ImportError as error:
            raise UsageError(f"--corpus {source}: install ir_datasets to index ir_datasets corpora (needs the network "
                             "or a filled ir_datasets cache)") from error
        try:
            dataset = ir_datasets.load(source.removeprefix("irds:"))
        except KeyError as error:
            raise UsageError(f"--corpus {source}: unknown ir_datasets id") from error
        fix = ftfy.fix_text if fix_text else str
        documents = ((doc.doc_id, fix(doc.default_text())) for doc in dataset.docs_iter())
        return documents, f"{source} (ftfy: {bool(fix_text)})"
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"--corpus {source}: no such file")
    if is_dl_json(path):
        fix_text = True if fix_text is None else fix_text
        try:
            stage = read_dl_json(path, fix_text=fix_text)
        except ValueError as error:
            raise UsageError(f"--corpus {source}: {error}") from error
        documents = ((c.docid, c.text) for hits in stage.candidates.values() for c in hits)
        return documents, f"TREC DL JSON {path.resolve()} (ftfy: {fix_text})"
    return fixed(iter_corpus(path), bool(fix_text)), f"corpus {path.resolve()} (ftfy: {bool(fix_text)})"


def is_dl_json(path: Path) -> bool:
    """Whether the file starts with ``[`` (a TREC DL JSON list); the other corpus formats start otherwise."""
    with open_text(path) as f:
        head = f.read(256).lstrip()
    return head.startswith("[")


def fixed(documents: Iterable[tuple[str, str]], fix_text: bool) -> Iterator[tuple[str, str]]:
    for docid, text in documents:
        yield docid, ftfy.fix_text(text) if fix_text else text


def run(args: argparse.Namespace) -> int:
    """Encode the corpus into the store and print documents, shards, time and documents per second."""
    check_output(args.output, "--output", folder=True)
    model_of(args, "sparse-ce index")
    threads = set_threads(args.threads)
    documents, description = corpus_documents(args.corpus, args.fix_text)
    device = resolve_device(args.device)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(args.model, trust_remote_code=True)
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {args.model}: {str(error).splitlines()[0]}") from error
    if model.config.model_type != MIXENCODER_TYPE:
        raise UsageError(f"--model {args.model}: model_type {model.config.model_type!r}; only MixEncoders "
                         f"({MIXENCODER_TYPE}) pre-compute their candidates")
    model.to(device).eval()
    rank, world = process_group()
    try:
        report = write_store(
            model, tokenizer, documents, args.output, corpus_name=description, batch_size=args.batch_size,
            shard_size=args.shard_size, dtype=args.storage_dtype, limit=args.limit_documents, overwrite=args.overwrite, rank=rank,
            world=world, progress=not args.no_progress,
        )
    except ValueError as error:
        raise UsageError(f"--output {args.output}: {error}") from error
    who = f"process {rank} of {world}: " if world > 1 else ""
    print(f"{who}{report.documents} documents in {report.shards} shards at {args.output}; encoded "
          f"{report.encoded_documents} documents ({report.encoded_shards} shards, {report.resumed_shards} already "
          f"complete) in {report.seconds:.1f} s: {report.documents_per_second:.1f} docs/s ({threads} thread(s), "
          f"{device})")
    return 0
