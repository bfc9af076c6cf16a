"""``sparse-ce rerank``: re-rank a first-stage run with a cross-encoder and write a TREC run.

The evaluation setting of Schlatt et al., ECIR 2024 (Table 1): re-rank the BM25 top-100 of TREC DL 2019/2020 and
report nDCG@10. Input is a TREC DL JSON file (queries, hits and passage texts) or a TREC run + topics + corpus;
with qrels, nDCG@10, RR@10 and R@100 (or ``--measures``) of the written run are printed (ir_measures), averaged
over the re-ranked queries that have judgements. Each query's candidates go through the model together (the sparse
model computes the query once), and under ``torchrun`` / ``accelerate launch`` the queries are split over the
processes and the main process writes one merged run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import ir_measures
from configuration_sparse_ce import ATTENTION_BACKENDS

from ..cli import UsageError
from ..errors import check_output, positive_int, run_tag
from ..provenance import looks_local
from ..data import FirstStage, read_dl_json, read_qrels, read_run_first_stage, write_run
from ..data.collections import measure_label
from ..runtime import resolve_device, set_threads
from .fusion import fuse_first_stage, resolve_weight, weight_argument
from .limits import QueryError, model_limits
from .scoring import DEFAULT_BATCH_TOKENS, DTYPES, PairScorer
from .shards import score_first_stage

if TYPE_CHECKING:
    from ..precompute.ranker import StoreScorer
    from ..precompute.store import CandidateStore

MEASURES = ("nDCG@10", "RR@10", "R@100")
"""The default measures; the binary ones at ``--relevant-grade`` (labels always carry it: ``RR(rel=2)@10``)."""

TREC_DL_RELEVANT_GRADE = 2
"""The lowest relevant grade of TREC DL passage judgements for binary measures (NIST's convention; ``evaluate``'s
``dl19``/``dl20`` use the same)."""


def _measure(name: str) -> ir_measures.Measure:
    """An ir_measures measure from its name, as an argparse type."""
    try:
        return ir_measures.parse_measure(name)
    except (NameError, SyntaxError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"not an ir_measures measure: {name!r} ({error})") from error


def with_threshold(measure: ir_measures.Measure, grade: int) -> ir_measures.Measure:
    """``measure`` with its relevance threshold in its label: a binary measure given without one (``RR@10``) gets
    ``rel=grade``; graded measures (nDCG) and explicit thresholds are kept."""
    if "rel" in measure.SUPPORTED_PARAMS and "rel" not in measure.params and measure.NAME != "nDCG":
        return measure(rel=grade)
    return measure


def default_relevant_grade(args: argparse.Namespace) -> int:
    """``--relevant-grade``, or 2 for a TREC DL JSON first stage (as ``evaluate`` measures dl19/dl20), else 1."""
    if args.relevant_grade is not None:
        return args.relevant_grade
    return TREC_DL_RELEVANT_GRADE if args.dl_json else 1


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of how pairs are scored, shared by ``rerank`` and ``evaluate``."""
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores this process may use, at most "
                        "OMP_NUM_THREADS)")
    parser.add_argument("--backend", choices=ATTENTION_BACKENDS, help="attention backend of sparse-ce models "
                        "(default: the model's own, normally auto: the fused kernel where one loads)")
    parser.add_argument("--batch-tokens", type=positive_int,
                        help="padded tokens per forward; a query's candidates stay together where they fit (default: "
                        + ", ".join(f"{n} on {d}" for d, n in DEFAULT_BATCH_TOKENS.items()) + ")")
    parser.add_argument("--max-length", type=positive_int,
                        help="tokens per row (default: the tokenizer's, capped by max_position_embeddings)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="compute dtype (default auto: bfloat16 where the CPU or GPU has bfloat16 arithmetic, "
                        "else float32)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``rerank`` options to ``parser``."""
    parser.add_argument(
        "--model", required=True, help="model folder or Hub id of a sequence-classification cross-encoder"
    )
    source = parser.add_argument_group("first stage: --dl-json FILE, or --run, --topics and --corpus")
    source.add_argument("--dl-json", help="TREC DL JSON: [{query, hits: [{qid, docid, rank, score, content}]}]")
    source.add_argument("--run", help="TREC run file: qid Q0 docid rank score tag")
    source.add_argument("--topics", help="topics: TSV qid<TAB>query (.gz allowed) or TREC <top> blocks")
    source.add_argument("--corpus", help="corpus: BEIR jsonl, TSV docid<TAB>text or TREC <DOC> (.gz allowed)")
    parser.add_argument("--output", required=True, help="TREC run file to write")
    parser.add_argument("--index", metavar="DIR", help="MixEncoder candidate store (sparse-ce index): score the "
                        "candidates from it (those it lacks on the fly); --corpus may then be left out")
    parser.add_argument("--qrels", help="TREC qrels: print the measures of the written run")
    parser.add_argument(
        "--measures",
        nargs="+",
        type=_measure,
        default=[_measure(name) for name in MEASURES],
        help=f"ir_measures names (default: {' '.join(MEASURES)}); binary ones without rel= count --relevant-grade",
    )
    parser.add_argument("--relevant-grade", type=positive_int, metavar="N",
                        help="lowest grade binary measures count as relevant (default: 2 with --dl-json, TREC DL's "
                        "convention as in evaluate; else 1)")
    add_scoring_arguments(parser)
    parser.add_argument("--maxp", action="store_true", help="score long documents by their best overlapping window")
    parser.add_argument("--limit-queries", type=positive_int, metavar="N", help="re-rank the first N queries only")
    parser.add_argument(
        "--fix-text",
        action=argparse.BooleanOptionalAction,
        help="repair mojibake with ftfy (default: on for --dl-json, off otherwise)",
    )
    parser.add_argument("--fuse-first-stage", type=weight_argument, default=0.0, metavar="WEIGHT",
                        help="rank by z(model) + WEIGHT * z(first-stage score) per query (default 0: the model alone)")
    parser.add_argument("--tag", type=run_tag, default="sparse-ce", help="run tag, one word (default: sparse-ce)")


def make_scorer(model: str, args: argparse.Namespace, progress: bool = True, maxp: bool = False) -> PairScorer:
    """The :class:`PairScorer` of ``--model`` and the scoring options; a bad model is a one-line :class:`UsageError`."""
    check_model_folder(model)
    try:
        device = resolve_device(args.device)
        return PairScorer(
            model, device=device, dtype=args.dtype, batch_tokens=args.batch_tokens,
            max_length=args.max_length,
            maxp=maxp, progress=progress, attention_backend=args.backend,
        )
    except (OSError, ValueError) as error:  # Hub id not found / offline, unusable tokenizer, bad max_length
        raise UsageError(f"--model {model}: {str(error).splitlines()[0]}") from error


def run(args: argparse.Namespace) -> int:
    """Re-rank, write the run and print truncation, measures, run path, time and throughput."""
    args.fuse_first_stage = check_fusion_argument(args.fuse_first_stage, args.model)
    check_output(args.output, "--output")
    threads = set_threads(args.threads)
    first_stage = _read_first_stage(args)
    if not first_stage.candidates:
        raise UsageError("the first stage has no query with candidates: nothing to re-rank")
    store = open_index(args) if args.index else None
    check_queries(args.model, first_stage, args)  # before the weights load
    scorer = make_scorer(args.model, args, progress=not args.no_progress, maxp=args.maxp)
    if store is not None:
        scorer = _store_scorer(scorer, store, first_stage, args)
    scored = score_first_stage(scorer, first_stage)
    if scored.scores is None:  # another process of a torchrun launch: the main one writes the run
        return 0
    ranking = first_stage.ranking(scored.scores)
    if args.fuse_first_stage:
        ranking = fuse_first_stage(ranking, first_stage, args.fuse_first_stage)
    write_run(args.output, ranking, args.tag)

    stats = scored.stats
    if scorer.untrained_head:
        print("WARNING: the classifier head is untrained; scores from an untrained classifier head mean nothing")
    if args.fuse_first_stage:
        print(f"scores fused with the first stage: z(model) + {args.fuse_first_stage:g} * z(first stage) per query")
    print(f"documents cut to max_length {scorer.max_length}: {stats.truncated} of {stats.pairs}")
    if args.maxp:
        print(f"documents split into MaxP windows: {stats.long_documents} of {stats.pairs} ({stats.rows} rows in all)")
    if args.qrels:
        measures = [with_threshold(m, default_relevant_grade(args)) for m in args.measures]
        print(_evaluate(measures, args.qrels, args.output, set(first_stage.candidates)))
    print(f"run: {args.output}")
    per_query = 1000 * scored.seconds / max(len(first_stage), 1)
    print(f"{len(first_stage)} queries, {stats.pairs} pairs in {scored.seconds:.1f} s: {scored.pairs_per_second:.1f} "
          f"pairs/s, {per_query:.1f} ms per query ({scored.processes} process(es) x {threads} thread(s), "
          f"{str(scorer.model.dtype).removeprefix('torch.')})")
    return 0


def check_model_folder(model: str, label: str | None = None) -> None:
    """Refuse a local path that is not a model folder in one line, naming ``label`` (default ``--model MODEL``;
    a Hub id is left to the loader)."""
    path = Path(model).expanduser()
    if looks_local(model) and not (path / "config.json").is_file():
        problem = "no such folder" if not path.exists() else "not a model folder (no config.json)"
        raise UsageError(f"{label or f'--model {model}'}: {problem}")


def check_queries(model: str, first_stage: FirstStage, args: argparse.Namespace, label: str | None = None) -> None:
    """Refuse an empty query or one too long for ``model`` (queries are never cut) as a usage error, from the
    model's config and tokenizer alone: before its weights load and before any forward. ``label`` names the model
    in errors (default ``--model MODEL``)."""
    check_model_folder(model, label)
    try:
        limits, tokenizer = model_limits(model, args.max_length)
        limits.check_queries(tokenizer, [first_stage.queries[q] for q in first_stage.candidates],
                             list(first_stage.candidates))
    except QueryError as error:
        raise UsageError(str(error)) from None
    except (OSError, ValueError) as error:  # Hub id not found / offline, unusable tokenizer, bad max_length
        raise UsageError(f"{label or f'--model {model}'}: {str(error).splitlines()[0]}") from error


def check_fusion_argument(weight: float | str | None, model: str) -> float | None:
    """``--fuse-first-stage`` as a number (``auto``: the weight stored with ``model``; ``None``: not given), or a
    usage error before scoring rather than after (the scores would be lost); ``rerank`` and ``evaluate`` call it."""
    try:
        return resolve_weight(weight, model)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _read_first_stage(args: argparse.Namespace) -> FirstStage:
    files = (args.run, args.topics, args.corpus)
    try:
        if args.dl_json and not any(files):
            fix = True if args.fix_text is None else args.fix_text
            return read_dl_json(args.dl_json, fix_text=fix, limit=args.limit_queries)
        if not args.dl_json and args.run and args.topics and (args.corpus or args.index):
            return read_run_first_stage(*files, fix_text=bool(args.fix_text), limit=args.limit_queries)
    except (OSError, ValueError) as error:
        raise UsageError(f"{'--dl-json' if args.dl_json else '--run/--topics/--corpus'}: {error}") from error
    raise UsageError("give either --dl-json FILE, or all of --run, --topics and --corpus (with --index: --corpus "
                     "optional)")


def open_index(args: argparse.Namespace) -> CandidateStore:
    """The candidate store of ``--index``; ``--dtype auto`` becomes the dtype of the weights that wrote it (``rerank``
    and ``serve``)."""
    from ..precompute.store import CandidateStore

    if getattr(args, "maxp", False):
        raise UsageError("--maxp: a candidate store holds each document cut to the model's max_candidate_length; "
                         "leave out --maxp or --index")
    try:
        store = CandidateStore.open(args.index)
    except (OSError, ValueError) as error:
        raise UsageError(f"--index {args.index}: {error}") from error
    if args.dtype == "auto":
        args.dtype = store.manifest.model_dtype
    return store


def _store_scorer(
    scorer: PairScorer, store: CandidateStore, first_stage: FirstStage, args: argparse.Namespace
) -> StoreScorer:
    """A scorer of ``first_stage`` from ``store``, for a MixEncoder ``--model`` of the store's weights."""
    from ..precompute.ranker import StoreScorer

    try:
        return StoreScorer(scorer, store, first_stage)
    except ValueError as error:
        raise UsageError(f"--index {args.index}: --model {args.model}: {error}") from error


def _evaluate(measures: list[ir_measures.Measure], qrels_path: str, run_path: str, qids: set[str]) -> str:
    """The measures of the written run over the re-ranked queries with judgements (unjudged ones have no value)."""
    try:
        qrels = [qrel for qrel in read_qrels(qrels_path) if qrel.query_id in qids]
    except (OSError, ValueError) as error:
        raise UsageError(f"--qrels: {error}") from error
    if not qrels:
        return f"no judgements in {qrels_path} for the {len(qids)} re-ranked queries"
    metrics = ir_measures.calc_aggregate(measures, qrels, ir_measures.read_trec_run(run_path))
    judged = len({qrel.query_id for qrel in qrels})
    return " ".join(f"{measure_label(m)}={metrics[m]:.4f}" for m in measures) + f" (queries judged: {judged})"
