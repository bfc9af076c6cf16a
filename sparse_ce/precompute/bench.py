"""``sparse-ce bench --precomputed``: Table 4 of MixEncoder ("Once is Enough", Wang et al.) on this machine.

Protocol: one query against 1,000 candidates (the BM25 passages of the first DL19 queries, pooled), time per query
with the candidates pre-computed where the system allows it, median and quartiles over ``--timed-queries`` queries
(``--cross-timed-queries`` for the two cross-encoders, whose queries take seconds each); text in, scores out (query
tokenisation included; candidate pre-computation excluded, as in the paper); every system cuts the query to the
MixEncoder's ``max_query_length`` and the candidate to its ``max_candidate_length`` (a cross-encoder pair to their
sum less the shared [CLS]). Each MixEncoder's time is also split into query encoding, store read and interaction
layers, with the interaction's arithmetic and this machine's GEMM rate (:mod:`.timing`). Systems, all on the same
BERT weights (the first MixEncoder's encoder):

- ``mixencoder-k{K}``: each given MixEncoder scoring from a candidate store (:class:`~.ranker.StoreRanker`);
- ``dual-encoder``: the mean-pooled query against stored mean-pooled candidates, by cosine;
- ``sparse-ce-w4`` and ``full-attention``: sentence-transformers ``CrossEncoder.predict`` over the 1,000 pairs with
  the encoder converted to the sparse w=4 pattern and to plain BERT (timing twins: the cross-encoder heads are new).

Storage is bytes per candidate in the store (float32). Quality (nDCG@10 over the BM25 top-100 of DL19/DL20) is
measured for the MixEncoders and the dual encoder (:mod:`.quality`, with a paired test of each MixEncoder against
the dual encoder on its own weights), and read from ``--quality`` (a JSON of other models' evaluations) for the
cross-encoders: their points in the figure are labelled as other models.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
from pathlib import Path

import torch

from ..bench.measure import environment
from ..bench.report import pyplot
from ..cli import UsageError
from ..data import read_dl_json
from .quality import paired_comparison, per_query_quality
from .ranker import StoreRanker
from .store import CandidateStore
from .timing import breakdown, spread, timed
from .writer import write_store

logger = logging.getLogger(__name__)

def add_arguments(group) -> None:
    """The ``--precomputed`` options of ``sparse-ce bench``."""
    group.add_argument("--precomputed", action="store_true", help="MixEncoder's Table 4 protocol instead (see "
                       "docs/precompute.md): needs --mix-models")
    group.add_argument("--mix-models", nargs="+", default=[], metavar="FOLDER", help="MixEncoder folders (k = 1, 2, 3)")
    group.add_argument("--candidates", type=int, default=1000, help="candidates per query (default 1000)")
    group.add_argument("--timed-queries", type=int, default=20, help="queries timed per system (median and "
                       "quartiles; default 20)")
    group.add_argument("--cross-timed-queries", type=int, default=5, help="queries timed for each cross-encoder "
                       "(1,000 forwards each; default 5)")
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
    max_length = mix.config.max_query_length + mix.config.max_candidate_length - 1  # one [CLS] for the pair
    calls = {}
    for name, folder, remote in (("full-attention", tmp / "full", False), ("sparse-ce-w4", tmp / "w4", True)):
        model = CrossEncoder(str(folder), trust_remote_code=remote, max_length=max_length, model_kwargs={"dtype": torch.float32})
        calls[name] = lambda query, model=model: model.predict([(query, t) for t in texts], batch_size=100)
    return calls


def system_name(config, taken: dict) -> str:
    """``mixencoder-k1``; other blocks, strategies and ablations as suffixes (``-light``, ``-S``, ``-without_H``)."""
    name = f"mixencoder-k{config.num_context}" + "".join(
        f"-{part}" for part in (config.interaction_block != "authors" and config.interaction_block,
                                config.context_strategy != "C" and config.context_strategy, config.ablation) if part)
    suffix, unique = 2, name
    while unique in taken:
        unique, suffix = f"{name}-{suffix}", suffix + 1
    return unique


def timing_entry(seconds: list[float], **fields) -> dict:
    stats = spread(seconds)
    return {"seconds": stats["median"], "q1": stats["q1"], "q3": stats["q3"], "timed_queries": stats["n"], **fields}


def run_precomputed(args: argparse.Namespace) -> dict:
    """Time every system, measure storage and quality, write results.json / results.md / quality-vs-time.png."""
    if not args.mix_models:
        raise UsageError("--precomputed: give the MixEncoder folders with --mix-models")
    torch.set_num_threads(args.threads)
    queries, passages = candidate_pool(args.data, args.candidates)
    timed_queries = queries[: args.timed_queries]
    quality = json.loads(args.quality.read_text()) if args.quality else {}
    docids = [d for d, _ in passages]
    systems: dict[str, dict] = {}
    dual_quality = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for folder in args.mix_models:
            model, tokenizer = _mix(folder)
            name = system_name(model.config, systems)
            report = write_store(model, tokenizer, passages, tmp / name, corpus_name="bench pool", progress=False)
            ranker = StoreRanker(model, tokenizer, CandidateStore.open(tmp / name, model))
            entry = timing_entry(
                timed(lambda q: ranker.score(q, docids), timed_queries), model=folder,
                bytes_per_candidate=model.config.num_context * model.config.hidden_size * 4,
                precompute_seconds=report.seconds, breakdown=breakdown(ranker, timed_queries, docids),
                block=model.config.interaction_block,
            )
            if not args.no_quality:
                measured = per_query_quality(model, tokenizer, args.data)
                entry["quality"] = _means(measured["mixencoder"])
                entry["vs_dual_encoder"] = paired_comparison(measured["mixencoder"], measured["dual-encoder"])
                dual_quality = dual_quality or _means(measured["dual-encoder"])  # the first model's weights
            systems[name] = entry
            logger.info("%s: %.4f s per query", name, entry["seconds"])
        model, tokenizer = _mix(args.mix_models[0])
        call, bytes_per = dual_encoder_call(model, tokenizer, passages)
        systems["dual-encoder"] = timing_entry(timed(call, timed_queries), bytes_per_candidate=bytes_per)
        if not args.no_quality:
            systems["dual-encoder"]["quality"] = dual_quality
        for name, call in cross_encoder_calls(model, tokenizer, passages, tmp).items():
            systems[name] = timing_entry(timed(call, queries[: args.cross_timed_queries]), bytes_per_candidate=0)
            if name in quality:
                systems[name]["quality"] = quality[name]
                systems[name]["quality_of_other_model"] = True
            logger.info("%s: %.2f s per query", name, systems[name]["seconds"])
    full = systems["full-attention"]["seconds"]
    dual = systems["dual-encoder"]["seconds"]
    for entry in systems.values():
        entry["speedup_vs_full"] = full / entry["seconds"]
        entry["vs_dual_encoder_time"] = entry["seconds"] / dual
    return {"protocol": {"candidates": args.candidates, "timed_queries": len(timed_queries),
                         "cross_timed_queries": min(args.cross_timed_queries, len(queries)), "threads": args.threads,
                         "max_query_length": model.config.max_query_length,
                         "max_candidate_length": model.config.max_candidate_length},
            "environment": environment(torch.device("cpu"), args.threads), "systems": systems,
            "quality_source": {k: "measured here" for k in systems if k.startswith(("mix", "dual"))} | {
                k: f"{args.quality} (another model; timing on this model's weights)" for k in quality}}


def _means(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    return {name: sum(values.values()) / len(values) for name, values in per_query.items()}


def markdown(results: dict) -> str:
    """The Table 4-style table (median, quartiles, ratios, storage, quality) and the MixEncoders' time breakdown."""
    p = results["protocol"]
    lines = [f"One query x {p['candidates']} candidates; median [q1, q3] of {p['timed_queries']} queries "
             f"({p['cross_timed_queries']} for the cross-encoders), {p['threads']} threads, float32, "
             f"{results['environment']['device']}; queries cut to {p['max_query_length']} tokens, candidates to "
             f"{p['max_candidate_length']}.", "",
             "| system | ms per query [q1, q3] | x dual encoder | speed-up vs full attention | bytes per stored candidate "
             "| DL19 nDCG@10 | DL20 nDCG@10 |", "|---|---|---|---|---|---|---|"]
    for name, e in results["systems"].items():
        q = e.get("quality", {})
        other = " (other model)" if e.get("quality_of_other_model") else ""
        cells = [f"{e['seconds'] * 1000:.1f} [{e['q1'] * 1000:.1f}, {e['q3'] * 1000:.1f}]",
                 f"{e['vs_dual_encoder_time']:.2f}", f"{e['speedup_vs_full']:.1f}x", str(e["bytes_per_candidate"] or "–"),
                 *(f"{q[c]:.4f}{other}" if c in q else "–" for c in ("dl19", "dl20"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    mixes = {n: e for n, e in results["systems"].items() if "breakdown" in e}
    if mixes:
        lines += ["", "| MixEncoder | encode query (ms) | read store (ms) | interaction + head (ms) | interaction GFLOP "
                  "| at this machine's GEMM rate (ms) | GEMM GFLOP/s |", "|---|---|---|---|---|---|---|"]
        for name, e in mixes.items():
            b = e["breakdown"]
            lines.append(f"| {name} | {b['encode_query'] * 1000:.1f} | {b['read_store'] * 1000:.1f} | "
                         f"{b['interaction'] * 1000:.1f} | {b['interaction_gflop']:.2f} | "
                         f"{b['interaction_at_gemm_rate'] * 1000:.1f} | {b['gemm_gflops']:.0f} |")
    compared = {n: e["vs_dual_encoder"] for n, e in results["systems"].items() if "vs_dual_encoder" in e}
    if compared:
        lines += ["", "| MixEncoder vs the dual encoder on its weights (DL19+DL20) | MixEncoder | dual | Δ | paired p "
                  "| Δ detectable (80% power) | TOST ±0.02 p |", "|---|---|---|---|---|---|---|"]
        for name, c in compared.items():
            lines.append(f"| {name} | {c['system']:.4f} | {c['baseline']:.4f} | {c['delta']:+.4f} | {c['p']:.3f} | "
                         f"{c['detectable_at_80']:.3f} | {c['tost_p']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path | None:
    """DL19 nDCG@10 against ms per query (log scale, quartile bars); other models' quality marked as such."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, e in results["systems"].items():
        if "dl19" in e.get("quality", {}):
            x, y = e["seconds"] * 1000, e["quality"]["dl19"]
            other = e.get("quality_of_other_model")
            ax.errorbar(x, y, xerr=[[x - e["q1"] * 1000], [e["q3"] * 1000 - x]], fmt="s" if other else "o",
                        mfc="none" if other else None, capsize=2)
            ax.annotate(name + (" (quality: other model)" if other else ""), (x, y), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("ms per query (1,000 candidates, CPU; bars: quartiles)")
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
