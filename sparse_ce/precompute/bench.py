"""``sparse-ce bench --precomputed``: Table 4 of MixEncoder ("Once is Enough", Wang et al.) on this machine.

Protocol: one query against 1,000 candidates (the BM25 passages of the first DL19 queries, pooled), time per query
with the candidates pre-computed where the system allows it, median over several queries; text in, scores out
(query tokenisation included; candidate pre-computation excluded, as in the paper). Systems, all on the same BERT
weights (the first MixEncoder's encoder):

- ``mixencoder-k{K}``: each given MixEncoder scoring from a candidate store (:class:`~.ranker.StoreRanker`);
- ``dual-encoder``: the mean-pooled query against stored mean-pooled candidates, by cosine;
- ``sparse-ce-w4`` and ``full-attention``: sentence-transformers ``CrossEncoder.predict`` over the 1,000 pairs with
  the encoder converted to the sparse w=4 pattern and to plain BERT (timing twins: the cross-encoder heads are new).

Storage is bytes per candidate in the store (float32). Quality (nDCG@10 over the BM25 top-100 of DL19/DL20) is
measured for the MixEncoders and the dual encoder from stores of those collections' passages, and read from
``--quality`` (a JSON of earlier evaluations, e.g. Table 1's trained models) for the cross-encoders.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..bench.measure import environment
from ..bench.report import pyplot
from ..cli import UsageError
from ..data import read_dl_json
from .ranker import StoreRanker
from .store import CandidateStore
from .writer import write_store

logger = logging.getLogger(__name__)

QUALITY_COLLECTIONS = ("dl19", "dl20")


def add_arguments(group) -> None:
    """The ``--precomputed`` options of ``sparse-ce bench``."""
    group.add_argument("--precomputed", action="store_true", help="MixEncoder's Table 4 protocol instead (see "
                       "docs/precompute.md): needs --mix-models")
    group.add_argument("--mix-models", nargs="+", default=[], metavar="FOLDER", help="MixEncoder folders (k = 1, 2, 3)")
    group.add_argument("--candidates", type=int, default=1000, help="candidates per query (default 1000)")
    group.add_argument("--timed-queries", type=int, default=3, help="queries timed per system (median; default 3)")
    group.add_argument("--quality", type=Path, help="JSON {system: {dl19: nDCG@10, dl20: ...}} for the cross-encoders")
    group.add_argument("--no-quality", action="store_true", help="skip the DL19/DL20 re-ranking of the MixEncoders")


def candidate_pool(data: Path, count: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Queries (DL19, in file order) and the first ``count`` distinct passages of their BM25 runs, pooled."""
    stage = read_dl_json(data / "trec-dl" / "bm25_top100_dl19.json")
    passages: dict[str, str] = {}
    for qid in stage.candidates:
        for candidate in stage.candidates[qid]:
            passages.setdefault(candidate.docid, candidate.text)
        if len(passages) >= count:
            break
    if len(passages) < count:
        raise ValueError(f"--candidates: DL19 holds {len(passages)} distinct passages, fewer than {count}")
    return [stage.queries[q] for q in stage.candidates], list(passages.items())[:count]


def median_seconds(call, queries: list[str]) -> float:
    """Median wall time of ``call(query)`` over ``queries`` after one untimed call."""
    call(queries[0])
    times = []
    for query in queries:
        start = time.perf_counter()
        call(query)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mix(folder: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def dual_encoder_call(model, tokenizer, passages: list[tuple[str, str]]):
    """The dual encoder on the MixEncoder's weights: stored mean-pooled candidates, the query encoded per call."""
    from modeling_mixencoder.modeling_mixencoder import masked_mean

    def encode(texts: list[str], max_length: int) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return masked_mean(model.bert(**batch).last_hidden_state, batch["attention_mask"].bool())

    with torch.inference_mode():
        stored = torch.cat([encode([t for _, t in passages[i : i + 64]], model.config.max_candidate_length)
                            for i in range(0, len(passages), 64)])
    stored = torch.nn.functional.normalize(stored, dim=-1)

    @torch.inference_mode()
    def call(query: str) -> list[float]:
        vector = torch.nn.functional.normalize(encode([query], model.config.max_query_length), dim=-1)
        return (stored @ vector[0]).tolist()

    return call, stored.shape[1] * 4


def cross_encoder_calls(mix, tokenizer, passages: list[tuple[str, str]], tmp: Path) -> dict:
    """``CrossEncoder.predict`` over all pairs for the MixEncoder's encoder as plain BERT and as sparse w=4."""
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    from ..convert import convert

    fields = {k: v for k, v in mix.config.to_dict().items() if k in BertConfig().to_dict()
              and k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    bert = BertForSequenceClassification(BertConfig(**{**fields, "num_labels": 1}))
    missing, unexpected = bert.load_state_dict(mix.state_dict(), strict=False)
    if [k for k in missing if not k.startswith(("bert.pooler.", "classifier."))]:
        raise ValueError(f"{mix.name_or_path}: encoder weights do not map onto BERT ({missing})")
    bert.save_pretrained(tmp / "full")
    tokenizer = copy.deepcopy(tokenizer)  # the MixEncoder's own stays as it is
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(tmp / "full")
    convert(tmp / "full", tmp / "w4", pattern="sparse", window=4, overwrite=True)
    texts = [t for _, t in passages]
    calls = {}
    for name, folder, remote in (("full-attention", tmp / "full", False), ("sparse-ce-w4", tmp / "w4", True)):
        model = CrossEncoder(str(folder), trust_remote_code=remote, max_length=512, model_kwargs={"dtype": torch.float32})
        calls[name] = lambda query, model=model: model.predict([(query, t) for t in texts], batch_size=100)
    return calls


def quality_of(model, tokenizer, data: Path, tmp: Path, dual: bool = False) -> dict[str, float]:
    """nDCG@10 of re-ranking the DL19/DL20 BM25 top-100 from a store (or by the dual encoder)."""
    import ir_measures

    from ..data import read_qrels

    results = {}
    for name in QUALITY_COLLECTIONS:
        year = {"dl19": 2019, "dl20": 2020}[name]
        stage = read_dl_json(data / "trec-dl" / f"bm25_top100_{name}.json")
        qrels = read_qrels(data / "trec-dl" / f"qrels.{name}-passage.txt")
        corpus = {c.docid: c.text for hits in stage.candidates.values() for c in hits}
        run = []
        if dual:
            for qid, hits in stage.candidates.items():
                call, _ = dual_encoder_call(model, tokenizer, [(c.docid, corpus[c.docid]) for c in hits])
                run += [ir_measures.ScoredDoc(qid, c.docid, s) for c, s in zip(hits, call(stage.queries[qid]))]
        else:
            folder = tmp / f"store-{name}-{id(model)}"
            write_store(model, tokenizer, corpus.items(), folder, corpus_name=f"DL{year} BM25 top-100", progress=False)
            ranker = StoreRanker(model, tokenizer, CandidateStore.open(folder, model))
            for qid, hits in stage.candidates.items():
                scores = ranker.score(stage.queries[qid], [c.docid for c in hits])
                run += [ir_measures.ScoredDoc(qid, c.docid, s) for c, s in zip(hits, scores)]
        judged = {q.query_id for q in qrels}
        run = [r for r in run if r.query_id in judged]
        results[name] = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrels, run)[ir_measures.nDCG @ 10]
    return results


def run_precomputed(args: argparse.Namespace) -> dict:
    """Time every system, measure storage and quality, write results.json / results.md / quality-vs-time.png."""
    if not args.mix_models:
        raise UsageError("--precomputed: give the MixEncoder folders with --mix-models")
    torch.set_num_threads(args.threads)
    queries, passages = candidate_pool(args.data, args.candidates)
    timed = queries[: args.timed_queries]
    quality = json.loads(args.quality.read_text()) if args.quality else {}
    systems: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for folder in args.mix_models:
            model, tokenizer = _mix(folder)
            name = f"mixencoder-k{model.config.num_context}"
            store = tmp / name
            report = write_store(model, tokenizer, passages, store, corpus_name="bench pool", progress=False)
            ranker = StoreRanker(model, tokenizer, CandidateStore.open(store, model))
            docids = [d for d, _ in passages]
            seconds = median_seconds(lambda q: ranker.score(q, docids), timed)
            bytes_per = model.config.num_context * model.config.hidden_size * 4
            entry = {"seconds": seconds, "bytes_per_candidate": bytes_per, "model": folder,
                     "precompute_seconds": report.seconds}
            if not args.no_quality:
                entry["quality"] = quality_of(model, tokenizer, args.data, tmp)
            systems[name] = entry
            logger.info("%s: %.4f s per query", name, seconds)
        model, tokenizer = _mix(args.mix_models[0])
        call, bytes_per = dual_encoder_call(model, tokenizer, passages)
        systems["dual-encoder"] = {"seconds": median_seconds(call, timed), "bytes_per_candidate": bytes_per}
        if not args.no_quality:
            systems["dual-encoder"]["quality"] = quality_of(model, tokenizer, args.data, tmp, dual=True)
        for name, call in cross_encoder_calls(model, tokenizer, passages, tmp).items():
            systems[name] = {"seconds": median_seconds(call, timed), "bytes_per_candidate": 0}
            if name in quality:
                systems[name]["quality"] = quality[name]
            logger.info("%s: %.2f s per query", name, systems[name]["seconds"])
    full = systems["full-attention"]["seconds"]
    for entry in systems.values():
        entry["speedup_vs_full"] = full / entry["seconds"]
    return {"protocol": {"candidates": args.candidates, "timed_queries": len(timed), "threads": args.threads},
            "environment": environment(torch.device("cpu"), args.threads), "systems": systems,
            "quality_source": {k: "measured here" for k in systems if k.startswith(("mix", "dual"))} | {
                k: str(args.quality) for k in quality}}


def markdown(results: dict) -> str:
    """The Table 4-style table: time per query, speed-up over full attention, storage, quality."""
    lines = [f"One query x {results['protocol']['candidates']} candidates, median of "
             f"{results['protocol']['timed_queries']} queries, {results['protocol']['threads']} threads, "
             f"{results['environment']['device']}.", "",
             "| system | ms per query | speed-up vs full attention | bytes per stored candidate | DL19 nDCG@10 | DL20 nDCG@10 |",
             "|---|---|---|---|---|---|"]
    for name, entry in results["systems"].items():
        q = entry.get("quality", {})
        cells = [f"{entry['seconds'] * 1000:.1f}", f"{entry['speedup_vs_full']:.1f}x",
                 str(entry["bytes_per_candidate"] or "–"), *(f"{q[c]:.4f}" if c in q else "–" for c in QUALITY_COLLECTIONS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path | None:
    """DL19 nDCG@10 against ms per query (log scale), one point per system with a quality figure."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in results["systems"].items():
        if "dl19" in entry.get("quality", {}):
            ax.scatter(entry["seconds"] * 1000, entry["quality"]["dl19"])
            ax.annotate(name, (entry["seconds"] * 1000, entry["quality"]["dl19"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per query (1,000 candidates, CPU)")
    ax.set_ylabel("DL19 nDCG@10 (BM25 top-100)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    results = run_precomputed(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "precomputed.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.output_dir / "precomputed.md").write_text(table)
    plot(results, args.output_dir / "precomputed.png")
    print(table)
    return 0
