"""``sparse-ce evaluate``: re-rank test collections with several systems, compare them to a baseline by a paired TOST.

Schlatt et al. (ECIR 2024, Table 1) claim that sparse cross-encoders are as effective as full attention: equivalent
within ±0.02 nDCG@10 by a paired two one-sided t-test (TOST; Schuirmann, 1987). This command re-ranks each
collection's first stage with every system (a cross-encoder folder, or a sentence-transformers bi-encoder scored by
cosine similarity), writes one TREC run per system and collection, computes the measures with ir_measures, and tests
every system against ``--baseline`` per collection and over all queries pooled. The first stage itself is reported
as the system ``bm25``; ``--fuse-first-stage W`` adds ``NAME+bm25`` per system, its run fused with the first stage
(:mod:`..rank.fusion`) without scoring again. Existing run files are reused (``--rerun`` recomputes them), so an
interrupted evaluation resumes where it stopped; each run carries a manifest of what produced it (model path, a hash
of its files, dtype, backend, max length, depth, query limit, text repair, package version;
:mod:`..provenance`) and is reused only when that manifest equals the requested one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import ir_measures
from ..cli import UsageError
from ..data import read_run, write_run
from ..data.collections import COLLECTIONS, Collection, load_collection, measure_label
from ..provenance import ModelNotFound, forget, matching_result, model_digest, package_version, write_manifest
from ..rank.fusion import fuse_first_stage, weight_argument
from ..errors import check_output, positive_int
from ..options import DEFAULT_DATA
from ..rank.rerank import add_scoring_arguments, check_fusion_argument, check_queries, make_scorer
from ..rank.shards import process_group, score_first_stage
from ..runtime import resolve_device, resolve_dtype, set_threads
from .equivalence import equivalence_summary, tost

logger = logging.getLogger(__name__)

FIRST_STAGE = "bm25"
PRIMARY = "nDCG@10"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", nargs="+", required=True, metavar="NAME=MODEL",
                        help="systems to evaluate: name=folder or Hub id (cross-encoder, or bi-encoder by cosine)")
    parser.add_argument("--collections", nargs="+", default=["dl19", "dl20"],
                        help=f"{', '.join(COLLECTIONS)} or irds:<id> (default: dl19 dl20)")
    parser.add_argument("--baseline", help="system the others are tested against (default: the first)")
    parser.add_argument("--bound", type=float, default=0.02, help="TOST equivalence bound on nDCG@10 (default 0.02)")
    parser.add_argument("--alpha", type=float, default=0.05, help="TOST significance level (default 0.05)")
    parser.add_argument("--depth", type=positive_int, default=100, help="candidates re-ranked per query (default 100)")
    parser.add_argument("--collection-depth", nargs="+", default=[], metavar="NAME=DEPTH",
                        help="another depth for some collections, e.g. scifact=30 (long abstracts)")
    parser.add_argument("--limit-queries", type=positive_int, metavar="N", help="first N judged queries of each collection")
    parser.add_argument("--output-dir", type=Path, required=True, help="runs/, results.json and results.md go here")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"offline data folder ({DEFAULT_DATA})")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sparse-ce", help="BM25 runs")
    add_scoring_arguments(parser)
    parser.add_argument("--fuse-first-stage", type=weight_argument, metavar="WEIGHT",
                        help="also report NAME+bm25 per system: z(system) + WEIGHT * z(first stage) per query "
                        "('auto': each system's stored weight)")
    parser.add_argument("--rerun", action="store_true", help="re-rank even where a run file exists")


def run(args: argparse.Namespace) -> int:
    check_output(args.output_dir, "--output-dir", folder=True)
    set_threads(args.threads)
    systems = dict(_parse_system(s) for s in args.system)
    digests = {name: _system_digest(name, model) for name, model in systems.items()}  # a missing model: before work
    baseline = args.baseline or next(iter(systems))
    if baseline not in systems and baseline != FIRST_STAGE:
        raise UsageError(f"--baseline: {baseline!r} is not one of the systems {', '.join(systems)}")
    requested = getattr(args, "fuse_first_stage", None)
    fusions = {name: check_fusion_argument(requested, model) for name, model in systems.items()}  # per system
    rank, _ = process_group()
    depths = _collection_depths(args)
    from ..train.teacher import is_bi_encoder

    collections = []
    for name in args.collections:  # all loaded and their queries checked before the first system scores
        depth = depths.get(name, args.depth)
        collection = truncate(load_collection(name, args.data, args.cache_dir, depth), depth, args.limit_queries)
        for system, model in systems.items():
            if not is_bi_encoder(model):
                check_queries(model, collection.first_stage, args, label=f"--system {system}={model}")
        collections.append((collection, depth))
    per_query = {}
    for collection, depth in collections:
        per_query[collection.name] = {}
        for system, model in systems.items():
            path = args.output_dir / "runs" / run_name(system, collection.name, depth, args.limit_queries)
            manifest = run_manifest(model, digests[system], collection, depth, args.limit_queries, args)
            if args.rerun or not matching_result(path, manifest):
                if rank == 0:
                    forget(path)
                rerank(model, collection, path, system, args)
                if rank == 0:
                    write_manifest(path, manifest)
            if rank != 0:
                continue
            run = read_run(path)
            per_query[collection.name][system] = measure_run(collection, run)
            if fusions[system]:  # 0 (like rerank's default): the model alone, no fused row
                fused = fuse_first_stage(run, collection.first_stage, fusions[system])
                fused_name = f"{system}+{FIRST_STAGE}"
                fused_path = path.with_name(run_name(fused_name, collection.name, depth, args.limit_queries))
                write_run(fused_path, fused, fused_name)
                per_query[collection.name][fused_name] = measure_run(collection, fused)
        per_query[collection.name][FIRST_STAGE] = first_stage_scores(collection)  # the reference line, listed last
    if rank != 0:  # another process of a torchrun launch: it helped score, the main one reports
        return 0
    results = compare(per_query, baseline, args.bound, args.alpha)
    results["setup"] = {"depth": args.depth, "collection_depths": depths, "limit_queries": args.limit_queries,
                        "bound": args.bound,
                        "alpha": args.alpha, "baseline": baseline, "systems": systems,
                        "fuse_first_stage": fusions}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results, args.alpha)
    (args.output_dir / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nruns, results.json and results.md in {args.output_dir}")
    return 0


def _collection_depths(args: argparse.Namespace) -> dict[str, int]:
    depths = {}
    for text in args.collection_depth:
        name, sep, depth = text.partition("=")
        if not sep or not depth.isdigit() or int(depth) < 1:
            raise UsageError(f"--collection-depth: expected NAME=DEPTH such as scifact=30, got {text!r}")
        if name not in args.collections:
            raise UsageError(f"--collection-depth: {name!r} is not one of --collections")
        depths[name] = int(depth)
    return depths


def _system_digest(name: str, model: str) -> str:
    try:
        return model_digest(model)
    except ModelNotFound as error:
        raise UsageError(f"--system {name}={model}: {str(error).removeprefix(model + ': ')}") from None


def run_manifest(model: str, digest: str, collection: Collection, depth: int, limit_queries: int | None,
                 options: argparse.Namespace) -> dict:
    """Everything that produced a run: a reused run must match it exactly. A bi-encoder scores in float32 with its
    own settings, so the cross-encoder options do not apply to it."""
    from ..train.teacher import is_bi_encoder

    cross = not is_bi_encoder(model)
    device = resolve_device(options.device)
    return {
        "model": str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model,
        "weights_sha256": digest,
        "scorer": "cross-encoder" if cross else "bi-encoder (cosine)",
        "dtype": resolve_dtype(options.dtype, device) if cross else "float32",
        "backend": options.backend if cross else None,
        "max_length": options.max_length if cross else None,
        "collection": collection.name,
        "depth": depth,
        "limit_queries": limit_queries,
        "text_repair": collection.text_repair,
        "sparse_ce_version": package_version(),
    }


def _parse_system(text: str) -> tuple[str, str]:
    name, sep, model = text.partition("=")
    if not sep or not name or not model:
        raise UsageError(f"--system: expected NAME=MODEL, got {text!r}")
    if name == FIRST_STAGE or "/" in name:
        raise UsageError(f"--system: {name!r} is reserved or not a plain name")
    return name, model


def run_name(system: str, collection: str, depth: int, limit_queries: int | None) -> str:
    """The run file of a system on a collection (depth and query limit in its name). Whether a saved run is reused
    is decided by its manifest (:func:`run_manifest`), not by this name."""
    return f"{system}-{collection}-top{depth}" + (f"-q{limit_queries}" if limit_queries else "") + ".run"


def truncate(collection: Collection, depth: int, limit_queries: int | None) -> Collection:
    """Keep the first ``limit_queries`` queries and the top ``depth`` candidates of each."""
    qids = list(collection.first_stage.candidates)[:limit_queries]
    stage = collection.first_stage
    stage = type(stage)({q: stage.queries[q] for q in qids}, {q: stage.candidates[q][:depth] for q in qids})
    return Collection(collection.name, stage, collection.qrels, collection.relevant_grade, collection.text_repair)


def first_stage_scores(collection: Collection) -> dict:
    return measure_run(collection, collection.first_stage.ranking())


def rerank(model: str, collection: Collection, path: Path, tag: str, options: argparse.Namespace | None = None,
           sharded: bool = True) -> None:
    """Re-rank the collection's first stage with ``model`` and write the TREC run to ``path``.

    A cross-encoder scores through :func:`~sparse_ce.rank.shards.score_first_stage` (the queries split over the
    processes of a torchrun launch); a sentence-transformers bi-encoder by cosine similarity, on the main process.
    ``options`` holds the scoring options of :func:`~sparse_ce.rank.rerank.add_scoring_arguments` (default: theirs).
    ``sharded=False`` scores everything in this process (a caller that runs on the main process only).
    """
    from ..train.teacher import Teacher, is_bi_encoder

    options = options or scoring_defaults()
    rank = process_group()[0] if sharded else 0
    stage = collection.first_stage
    if is_bi_encoder(model):
        if rank != 0:
            return
        _, queries, documents = stage.pairs()
        scores = Teacher(model, device=options.device).score(queries, documents)
    else:
        scorer = make_scorer(model, options, progress=not getattr(options, "no_progress", False))
        scored = score_first_stage(scorer, stage, sharded=sharded)
        if scored.scores is None:
            return
        scores = scored.scores
        logger.info("%s on %s: %d pairs at %.1f pairs/s", tag, collection.name, scored.stats.pairs,
                    scored.pairs_per_second)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_run(path, stage.ranking(scores), tag)
    logger.info("%s on %s: run written to %s", tag, collection.name, path)


def scoring_defaults() -> argparse.Namespace:
    """The defaults of the scoring options (``rerank`` / ``evaluate`` command line) as a namespace."""
    parser = argparse.ArgumentParser()
    add_scoring_arguments(parser)
    return parser.parse_args([])


def measure_run(collection: Collection, run: dict[str, list[tuple[str, float]]]) -> dict:
    """Per-query values and means of the collection's measures over its judged re-ranked queries.

    Queries of the first stage missing from ``run`` count as zero (a lost query must not raise the mean).
    """
    qids = set(collection.first_stage.candidates)
    qrels = [q for q in collection.qrels if q.query_id in qids]
    judged = sorted({q.query_id for q in qrels})
    flat = [ir_measures.ScoredDoc(qid, docid, score) for qid, hits in run.items() if qid in qids for docid, score in hits]
    measures = collection.measures()
    labels = {str(m): measure_label(m) for m in measures}  # RR(rel=1)@10, not RR@10: the threshold in every label
    values: dict[str, dict[str, float]] = {labels[str(m)]: {qid: 0.0 for qid in judged} for m in measures}
    for metric in ir_measures.iter_calc(measures, qrels, flat):
        values[labels[str(metric.measure)]][metric.query_id] = float(metric.value)
    return {
        "mean": {m: sum(v.values()) / max(len(v), 1) for m, v in values.items()},
        "per_query": values[PRIMARY],
        "queries": len(judged),
    }


def compare(per_query: dict[str, dict[str, dict]], baseline: str, bound: float, alpha: float = 0.05) -> dict:
    """Means, Δ nDCG@10 to the baseline and TOST p-values per collection; over all queries pooled also the
    interval of Δ and the power of the test (:func:`.equivalence.equivalence_summary`)."""
    results: dict = {"collections": {}, "pooled": {}}
    pooled: dict[str, list[float]] = {}
    for collection, systems in per_query.items():
        base = systems[baseline]["per_query"]
        rows = {}
        for system, measured in systems.items():
            diffs = [measured["per_query"][q] - base[q] for q in base]
            rows[system] = {**measured["mean"], "queries": measured["queries"],
                            "delta": sum(diffs) / max(len(diffs), 1), "tost_p": tost(diffs, bound),
                            "per_query": measured["per_query"]}
            pooled.setdefault(system, []).extend(diffs)
        results["collections"][collection] = rows
    for system, diffs in pooled.items():
        results["pooled"][system] = equivalence_summary(diffs, bound, alpha)
    return results


def markdown(results: dict, alpha: float = 0.05) -> str:
    """nDCG@10 per collection with Δ to the baseline and TOST p-values (marked ✓ below ``alpha``)."""
    collections = list(results["collections"])
    systems = list(next(iter(results["collections"].values()))) if collections else []
    baseline = results.get("setup", {}).get("baseline", "")
    head = "| system | " + " | ".join(f"{c} nDCG@10 | Δ | TOST p" for c in collections) + " | all: Δ | all: TOST p |"
    lines = [head, "|---" * (1 + 3 * len(collections) + 2) + "|"]
    for system in systems:
        cells = [f"`{system}`" + (" (baseline)" if system == baseline else "")]
        for c in collections:
            row = results["collections"][c][system]
            cells += [f"{row[PRIMARY]:.4f}", *_delta_cells(row, system == baseline, alpha)]
        cells += _delta_cells(results["pooled"][system], system == baseline, alpha)
        lines.append("| " + " | ".join(cells) + " |")
    setup = results.get("setup", {})
    lines.append("")
    counts = ", ".join(f"{c} {next(iter(rows.values()))['queries']}" for c, rows in results["collections"].items())
    lines.append(
        f"Queries: {counts}; re-ranking depth {setup.get('depth')}"
        + "".join(f" ({c}: {d})" for c, d in (setup.get("collection_depths") or {}).items())
        + f"; TOST bound ±{setup.get('bound')}, "
        f"✓ = equivalent at α={alpha}."
    )
    lines += ["", f"Pooled over all queries: the {1 - 2 * alpha:.0%} interval of Δ (equivalence ⇔ inside ±{setup.get('bound')}), "
              "the spread of per-query differences, the power of this TOST if the system were in truth equal to the "
              "baseline, and the queries 80% power would need.", "",
              "| system | Δ | interval | SD | power at Δ=0 | queries for 80% |", "|---|---|---|---|---|---|"]
    for system in systems:
        row = results["pooled"][system]
        if system != baseline and "sd" in row:
            needed = row["queries_for_80"]
            lines.append(f"| `{system}` | {row['delta']:+.4f} | [{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}] | "
                         f"{row['sd']:.4f} | {row['power_at_zero']:.2f} ({row['queries']} queries) | "
                         f"{needed if needed is not None else 'n/a'} |")
    other = {c: [m for m in rows[systems[0]] if "@" in m and m != PRIMARY] for c, rows in results["collections"].items()}
    lines += ["", "| system | " + " | ".join(f"{c} {m}" for c in collections for m in other[c]) + " |",
              "|---" * (1 + sum(map(len, other.values()))) + "|"]
    for system in systems:
        cells = [f"{results['collections'][c][system][m]:.4f}" for c in collections for m in other[c]]
        lines.append("| " + " | ".join([f"`{system}`", *cells]) + " |")
    return "\n".join(lines)


def _delta_cells(row: dict, is_baseline: bool, alpha: float) -> list[str]:
    if is_baseline:
        return ["–", "–"]
    p = row["tost_p"]
    mark = " ✓" if p < alpha else ""
    return [f"{row['delta']:+.4f}", f"{p:.3f}{mark}" if not math.isnan(p) else "n/a"]


def evaluate_model(model: str, collections: Iterable[str], data: str | Path, depth: int = 100,
                   limit_queries: int | None = None, cache_dir: str | Path | None = None,
                   run_dir: str | Path | None = None,
                   options: argparse.Namespace | None = None) -> dict[str, dict[str, float]]:
    """Means of the measures of one model on each collection (used by ``train_st.py --eval``), scored in this
    process only.

    Runs go to ``run_dir/<collection>.run`` (default: a temporary folder, removed afterwards); BM25 runs are cached in
    ``cache_dir`` (default ``~/.cache/sparse-ce``).
    """
    import tempfile

    cache_dir = cache_dir or Path.home() / ".cache" / "sparse-ce"
    results = {}
    with tempfile.TemporaryDirectory(prefix="sparse-ce-eval-") as scratch:
        for name in collections:
            collection = truncate(load_collection(name, data, cache_dir, depth), depth, limit_queries)
            path = Path(run_dir or scratch) / f"{collection.name}.run"
            rerank(model, collection, path, "sparse-ce", options, sharded=False)
            measured = measure_run(collection, read_run(path))
            results[collection.name] = {**{m: round(v, 4) for m, v in measured["mean"].items()},
                                        "queries": measured["queries"]}
    return results


def markdown_single(results: dict[str, dict[str, float]], depth: int, limit_queries: int | None) -> str:
    """One model's test scores as a Markdown table (for its model card); each row's binary measures name their
    relevance threshold (grade ≥ 2 on TREC DL, ≥ 1 elsewhere) in a column of their own."""
    def generic(measure: str) -> str:
        return re.sub(r"\(rel=\d+\)", "", measure)

    def threshold(row: dict) -> str:
        grades = sorted({m for label in row for m in re.findall(r"\(rel=(\d+)\)", label)})
        return " / ".join(f"≥ {g}" for g in grades) or "–"

    measures = [m for m in next(iter(results.values())) if m != "queries"]
    lines = ["| collection | queries | relevant (RR, R) | " + " | ".join(map(generic, measures)) + " |",
             "|---" * (3 + len(measures)) + "|"]
    for name, row in results.items():
        values = [v for m, v in row.items() if m != "queries"]
        lines.append(f"| {name} | {row['queries']} | grade {threshold(row)} | "
                     + " | ".join(f"{v:.4f}" for v in values) + " |")
    scope = f"first {limit_queries} queries, " if limit_queries else ""
    return "\n".join(lines) + f"\n\nRe-ranking the first-stage top-{depth} ({scope}judged queries)."
