"""MixEncoder candidate stores: stored scores equal pair scores; weight hash, resume, per-process shards; the
``sparse-ce index`` and ``sparse-ce rerank --index`` commands."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import TINY_MODEL, make_tokenizer
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from sparse_ce.cli import main
from sparse_ce.precompute.convert import convert_mixencoder
from sparse_ce.precompute.ranker import StoreRanker
from sparse_ce.precompute.store import CandidateStore, model_hash
from sparse_ce.precompute.writer import write_store
from sparse_ce.rank.scoring import load_tokenizer

MAX_QUERY_LENGTH, MAX_CANDIDATE_LENGTH = 16, 12
LONG = "the flea life cycle is long in cold water and the dog and the cat grow fast in light and heat"
DOCS = {
    "d1": "a flea can live up to a year",
    "d2": "the dog",
    "d3": LONG,  # longer than MAX_CANDIDATE_LENGTH tokens: cut
    "d4": "goldfish grow fast in water",
    "d5": "",
    "d6": "sparse attention uses a window of tokens",
    "d7": "wifi vs bluetooth",
}
QUERIES = {"q1": "how long is the life cycle of a flea", "q2": "do goldfish grow",
           "q3": "what is the sparse attention window of a model and how does it rank"}  # 14 tokens: the limit
TOO_LONG = "what is the sparse attention window of a model and how does it rank a query and a document"


@torch.inference_mode()
def score_on_the_fly(
    model: torch.nn.Module, tokenizer: object, query: str, texts: Sequence[str], batch_size: int = 64
) -> list[float]:
    """The reference route: ``[CLS] query [SEP] text [SEP]`` rows through ``model(**pairs)``, as ``CrossEncoder`` does.

    Texts are cut only where the model would cut them anyway: the model splits each row and keeps
    ``max_candidate_length`` tokens of the candidate ([CLS] and [SEP] included).
    """
    model.eval()
    query_tokens = len(tokenizer(query, add_special_tokens=False)["input_ids"])
    max_length = query_tokens + 3 + model.config.max_candidate_length - 2  # [CLS] q [SEP] d [SEP]
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        inputs = tokenizer([query] * len(batch), batch, padding=True, truncation="only_second", max_length=max_length,
                           return_tensors="pt").to(model.device)
        scores += model(**inputs).logits[:, 0].float().cpu().tolist()
    return scores


def make_mixencoder(folder: Path, strategy: str, seed: int = 1) -> Path:
    """A tiny MixEncoder (k=2, interaction at both layers) with every weight perturbed, so interaction matters."""
    bert = folder / "bert"
    tokenizer = make_tokenizer(bert)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), max_query_length=MAX_QUERY_LENGTH,
                        max_candidate_length=MAX_CANDIDATE_LENGTH, **TINY_MODEL)
    BertModel(config).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    out = convert_mixencoder(bert, folder / "mix", num_context=2, strategy=strategy, interaction_layers=[0, 1])
    model = load_model(out)
    perturb(model, seed)
    model.save_pretrained(out)
    return out


def perturb(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))


def load_model(folder: Path):
    return AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()


@pytest.fixture(scope="module", params=["S", "C"])
def mix_dir(request, tmp_path_factory) -> Path:
    return make_mixencoder(tmp_path_factory.mktemp(f"mix-{request.param}"), request.param)


@pytest.fixture(scope="module")
def mix_c_dir(tmp_path_factory) -> Path:
    return make_mixencoder(tmp_path_factory.mktemp("mix-c"), "C")


def write(folder: Path, model_dir: Path, docs: dict[str, str] | list[tuple[str, str]] = DOCS, **options):
    options = {"shard_size": 2, "batch_size": 2, "progress": False, **options}
    docs = list(docs.items()) if isinstance(docs, dict) else docs
    return write_store(load_model(model_dir), load_tokenizer(str(model_dir)), docs, folder, **options)


def contents(folder: Path) -> tuple[dict, dict]:
    """The manifest and, per shard file, its metadata and tensors."""
    shards = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            shards[path.name] = (f.metadata(), {name: f.get_tensor(name) for name in f.keys()})
    return json.loads((folder / "store.json").read_text()), shards


def assert_same_store(a: Path, b: Path, atol: float = 0.0) -> None:
    """Same manifest, shards, ids; tensors equal (bit for bit with ``atol`` 0: same process, same threads)."""
    manifest_a, shards_a = contents(a)
    manifest_b, shards_b = contents(b)
    assert manifest_a == manifest_b
    assert shards_a.keys() == shards_b.keys()
    for name, (metadata, tensors) in shards_a.items():
        assert metadata == shards_b[name][0]
        assert tensors.keys() == shards_b[name][1].keys()
        for key, tensor in tensors.items():
            torch.testing.assert_close(tensor, shards_b[name][1][key], rtol=0, atol=atol, msg=f"{name} {key}")


def test_store_scores_equal_pair_scores(mix_dir, tmp_path):
    model, tokenizer = load_model(mix_dir), load_tokenizer(str(mix_dir))
    report = write(tmp_path / "store", mix_dir, [*DOCS.items(), ("d1", "a repeated doc id: skipped")])
    assert (report.documents, report.shards, report.encoded_shards) == (7, 4, 4)
    store = CandidateStore.open(tmp_path / "store", model)
    assert len(store) == 7 and "d3" in store and "nope" not in store
    assert store.get(["d3"], "lengths").item() > MAX_CANDIDATE_LENGTH - 2  # d3 was cut
    ranker = StoreRanker(model, tokenizer, store, batch_size=3)
    docids = list(DOCS)
    for query in QUERIES.values():
        stored = torch.tensor(ranker.score(query, docids))
        pairs = torch.tensor(score_on_the_fly(model, tokenizer, query, list(DOCS.values()), batch_size=4))
        torch.testing.assert_close(stored, pairs, rtol=0, atol=1e-5)
        assert stored.std() > 1e-3  # the documents are told apart
        ranked = ranker.rank(query, docids, top_k=3)
        assert [d for d, _ in ranked] == [docids[i] for i in stored.argsort(descending=True)[:3]]
    with pytest.raises(KeyError, match="nope"):
        ranker.score("dog", ["d1", "nope"])
    with pytest.raises(ValueError, match="19 tokens exceed the MixEncoder's max_query_length 16"):
        ranker.score(TOO_LONG, docids)  # never cut


def test_ranker_from_pretrained_ranks_stored_ids(mix_c_dir, tmp_path):
    write(tmp_path / "store", mix_c_dir)
    ranker = StoreRanker.from_pretrained(str(mix_c_dir), str(tmp_path / "store"), device="cpu")
    scores = ranker.score(QUERIES["q1"], list(DOCS))
    ranked = ranker.rank(QUERIES["q1"], list(DOCS), top_k=3)
    assert [d for d, _ in ranked] == sorted(DOCS, key=lambda d: -scores[list(DOCS).index(d)])[:3]
    with pytest.raises(KeyError, match="not in the store"):
        ranker.score(QUERIES["q1"], ["d1", "nope"])


def test_store_of_another_model_is_refused(mix_dir, mix_c_dir, tmp_path):
    write(tmp_path / "store", mix_dir)
    other = load_model(mix_dir)
    perturb(other, seed=7)
    written = CandidateStore.open(tmp_path / "store").manifest.model_hash
    assert written == model_hash(load_model(mix_dir)) != model_hash(other)
    message = f"was written by model {written} .*not this model {model_hash(other)}"
    with pytest.raises(ValueError, match=message):
        CandidateStore.open(tmp_path / "store", other)
    with pytest.raises(ValueError, match=message):
        StoreRanker(other, load_tokenizer(str(mix_dir)), CandidateStore.open(tmp_path / "store"))
    with pytest.raises(ValueError, match="was written by model"):  # resuming with other weights
        write_store(other, load_tokenizer(str(mix_dir)), list(DOCS.items()), tmp_path / "store", progress=False)
    if load_model(mix_dir).config.context_strategy == "S":
        with pytest.raises(ValueError, match="context_strategy is 'S', the model's is 'C'"):
            CandidateStore.open(tmp_path / "store", load_model(mix_c_dir))


def test_resume_after_interruption_equals_uninterrupted(mix_c_dir, tmp_path):
    write(tmp_path / "whole", mix_c_dir)

    def interrupt(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "resumed", mix_c_dir, on_shard=interrupt)
    written = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert written == ["shard-00000.safetensors", "shard-00001.safetensors"]  # no manifest, no temporary file
    report = write(tmp_path / "resumed", mix_c_dir)
    assert (report.resumed_shards, report.encoded_shards, report.encoded_documents) == (2, 2, 3)
    assert_same_store(tmp_path / "whole", tmp_path / "resumed")

    write(tmp_path / "limited", mix_c_dir, limit=3)  # shard 1 holds one of its two documents
    assert CandidateStore.open(tmp_path / "limited").get(["d1", "d3"]).shape == (2, 2, 32)
    report = write(tmp_path / "limited", mix_c_dir)
    assert (report.resumed_shards, report.encoded_shards) == (1, 3)
    assert_same_store(tmp_path / "whole", tmp_path / "limited")
    write(tmp_path / "limited", mix_c_dir, limit=3)  # a shorter corpus again: stale shards removed
    assert len(CandidateStore.open(tmp_path / "limited")) == 3

    with pytest.raises(ValueError, match="holds other documents"):
        write(tmp_path / "whole", mix_c_dir, {"x": "other", **DOCS})
    write(tmp_path / "whole", mix_c_dir, {"x": "other", **DOCS}, overwrite=True)
    assert len(CandidateStore.open(tmp_path / "whole")) == 8


def test_two_processes_equal_one_and_missing_shards_are_named(mix_c_dir, tmp_path):
    write(tmp_path / "one", mix_c_dir, dtype="float16")
    assert write(tmp_path / "two", mix_c_dir, dtype="float16", rank=0, world=2).encoded_shards == 2
    with pytest.raises(FileNotFoundError, match=r"2 of 4 shards missing \(shard-00001.safetensors, shard-00003"):
        CandidateStore.open(tmp_path / "two")
    assert write(tmp_path / "two", mix_c_dir, dtype="float16", rank=1, world=2).encoded_shards == 2
    assert_same_store(tmp_path / "one", tmp_path / "two")
    assert CandidateStore.open(tmp_path / "two").get(["d2"]).dtype == torch.float16
    (tmp_path / "two" / "shard-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 4 shards missing \\(shard-00002.safetensors\\)"):
        CandidateStore.open(tmp_path / "two")


@pytest.fixture
def dl_json(tmp_path) -> Path:
    """Three queries over DOCS as TREC DL JSON (documents repeat across queries)."""
    order = list(DOCS)
    entries = [
        {"query": text, "hits": [{"qid": qid, "docid": d, "rank": r, "score": 10.0 - r, "content": DOCS[d]}
                                 for r, d in enumerate(order[n:] + order[:n], 1)]}
        for n, (qid, text) in enumerate(QUERIES.items())
    ]
    path = tmp_path / "dl.json"
    path.write_text(json.dumps(entries))
    return path


def test_index_command(mix_c_dir, tiny_model_dir, dl_json, tmp_path, capsys):
    args = ["index", "--model", str(mix_c_dir), "--shard-size", "3", "--batch-size", "2", "--no-progress", "--threads", "1"]
    assert main([*args, "--corpus", str(dl_json), "--output", str(tmp_path / "dl"), "--limit-documents", "4"]) == 0
    assert "4 documents in 2 shards" in capsys.readouterr().out
    assert main([*args, "--corpus", str(dl_json), "--output", str(tmp_path / "dl")]) == 0
    out = capsys.readouterr().out
    assert "7 documents in 3 shards" in out and "1 already complete" in out and "docs/s" in out
    store = CandidateStore.open(tmp_path / "dl", load_model(mix_c_dir))
    assert sorted(store.index) == sorted(DOCS) and "TREC DL JSON" in store.manifest.corpus

    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in DOCS.items()))
    assert main([*args, "--corpus", str(jsonl), "--output", str(tmp_path / "beir")]) == 0
    beir = CandidateStore.open(tmp_path / "beir")
    torch.testing.assert_close(beir.get(list(DOCS)), store.get(list(DOCS)), rtol=0, atol=1e-6)

    assert main([*args, "--corpus", str(tmp_path / "none.tsv"), "--output", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["index", "--model", str(tiny_model_dir), "--corpus", str(jsonl), "--output", str(tmp_path / "y")]) == 2
    assert "only MixEncoders" in capsys.readouterr().err
    # the old spellings still work, each with one deprecation line: positional MODEL, --dtype, --limit
    old = ["index", str(mix_c_dir), "--corpus", str(jsonl), "--output", str(tmp_path / "old"), "--no-progress",
           "--dtype", "float16", "--limit", "2"]
    assert main(old) == 0
    err = capsys.readouterr().err
    for spelling, new in (("a positional MODEL", "--model MODEL"), ("--dtype", "--storage-dtype"),
                          ("--limit", "--limit-documents")):
        assert f"sparse-ce index: {spelling} is deprecated; use {new}" in err
    assert CandidateStore.open(tmp_path / "old").manifest.dtype == "float16" and len(CandidateStore.open(tmp_path / "old")) == 2


def read_scores(path: Path) -> dict[tuple[str, str], float]:
    return {(line.split()[0], line.split()[2]): float(line.split()[4]) for line in path.read_text().splitlines()}


def test_rerank_from_index_equals_rerank(mix_c_dir, tiny_model_dir, dl_json, tmp_path, capsys):
    index = tmp_path / "store"
    assert main(["index", "--model", str(mix_c_dir), "--corpus", str(dl_json), "--output", str(index), "--no-progress",
                 "--shard-size", "4", "--limit-documents", "6"]) == 0  # d7 not in the store: scored on the fly
    # q3 fills max_query_length: the pair rows still leave its documents max_candidate_length tokens
    rerank = ["rerank", "--model", str(mix_c_dir), "--dl-json", str(dl_json), "--dtype", "float32", "--no-progress"]
    too_long = tmp_path / "too-long.json"
    too_long.write_text(dl_json.read_text().replace(QUERIES["q3"], TOO_LONG))
    for extra in ([], ["--index", str(index)]):  # a query over max_query_length is refused, never cut
        assert main([*rerank[:4], str(too_long), *rerank[5:], "--output", str(tmp_path / "long.run"), *extra]) == 2
        assert "19 tokens exceed the MixEncoder's max_query_length 16" in capsys.readouterr().err
    assert not (tmp_path / "long.run").exists()
    assert main([*rerank, "--output", str(tmp_path / "plain.run")]) == 0
    assert main([*rerank, "--output", str(tmp_path / "index.run"), "--index", str(index)]) == 0
    out = capsys.readouterr().out
    tokens = load_tokenizer(str(mix_c_dir))(list(DOCS.values()), add_special_tokens=False)["input_ids"]
    cut = 3 * sum(len(ids) > MAX_CANDIDATE_LENGTH - 2 for ids in tokens)  # per query
    assert "3 queries, 21 pairs" in out and f"documents cut to max_length 12: {cut} of 21" in out
    plain, stored = read_scores(tmp_path / "plain.run"), read_scores(tmp_path / "index.run")
    assert plain.keys() == stored.keys() and len(plain) == 21
    for pair, score in plain.items():
        assert stored[pair] == pytest.approx(score, abs=1e-5), pair

    # --run and --topics without a corpus: the store holds the candidates, textless ones must be in it
    first = ["d1", "d4", "d2"]
    (tmp_path / "first.run").write_text("".join(f"q2 Q0 {d} {r} {9 - r} bm25\n" for r, d in enumerate(first, 1)))
    (tmp_path / "topics.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in QUERIES.items()))
    by_run = ["rerank", "--model", str(mix_c_dir), "--run", str(tmp_path / "first.run"), "--topics",
              str(tmp_path / "topics.tsv"), "--dtype", "float32", "--no-progress", "--index", str(index)]
    assert main([*by_run, "--output", str(tmp_path / "by-run.run")]) == 0
    assert read_scores(tmp_path / "by-run.run") == pytest.approx({("q2", d): stored["q2", d] for d in first})
    (tmp_path / "first.run").write_text("q2 Q0 d7 1 1.0 bm25\n")
    assert main([*by_run, "--output", str(tmp_path / "x.run")]) == 2
    error = capsys.readouterr().err
    assert "neither in store" in error and "['d7']" in error

    not_mixencoder = [*rerank[:2], str(tiny_model_dir), *rerank[3:]]
    assert main([*not_mixencoder, "--output", str(tmp_path / "y.run"), "--index", str(index)]) == 2
    assert "is not a MixEncoder" in capsys.readouterr().err


@pytest.mark.slow
def test_index_under_torchrun_each_process_writes_its_shards(mix_c_dir, tmp_path):
    """Two CPU processes (gloo) each encode every other shard; the store equals a single process's."""
    import os
    import subprocess
    import sys

    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in DOCS.items()))
    args = ["index", "--model", str(mix_c_dir), "--corpus", str(jsonl), "--shard-size", "2", "--batch-size", "2", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "single")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543", "-m",
               "sparse_ce.cli", *args, "--output", str(tmp_path / "two")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2" in result.stdout and "process 1 of 2" in result.stdout
    assert result.stdout.count("(2 shards, 0 already complete)") == 2  # each process encoded two of the four
    assert_same_store(tmp_path / "single", tmp_path / "two", atol=1e-6)  # other processes, other thread counts
