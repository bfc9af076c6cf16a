"""``sparse-ce analyze {ablate,heads,svd}``: the matching-mechanism analysis as commands.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604). Each sub-command writes JSON, a Markdown
table (ablate) and PNG figures into ``--output-dir``; see :mod:`.ablate` (``--heads``: :mod:`.head_ablation`),
:mod:`.heads` and :mod:`.svd`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from ..cli import UsageError
from ..data.collections import load_collection
from ..errors import check_output, positive_int, require
from ..eval.evaluate import truncate
from ..options import DEFAULT_DATA, add_model, add_renamed, model_of
from ..rank.rerank import add_scoring_arguments, check_queries, make_scorer
from ..runtime import set_threads
from .directions import ABLATION_MODES, ABLATION_SETS
from .head_ablation import parse_head

DEFAULT_DEPTH = 20  # not options.DEFAULT_DEPTH (100): ablation scores each collection once per variant
"""Candidates re-ranked per query by ``ablate``: 88 variants of DL19's 43 queries at depth 20 fit in ~30 minutes on
two CPU cores (most variants run on the dense backend); the default sets are 93 variants, ``--sets directions-all``
26."""
DEFAULT_SETS = ("directions", "groups")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", required=True)
    ablate = sub.add_parser("ablate", help="nDCG@10 with each of the 25 directions (and groups) removed")
    heads = sub.add_parser("heads", help="per-head attention across query and document: relevant vs negatives")
    svd = sub.add_parser("svd", help="SVD alignment of each head's query-key matrix, against heads.json")
    for command in (ablate, heads, svd):
        add_model(command, "model folder or Hub id (a sparse-ce model for ablate)", positional_alias=True)
        command.add_argument("--output-dir", type=Path, default=Path("analysis"), help="where results go (./analysis)")
    for command in (ablate, heads):
        add_renamed(command, "--collections", "--collection", dest="collections", nargs="+", required=True,
                    help="dl19, dl20, vaswani, scifact or irds:<id> (--collection: deprecated spelling)")
        command.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"offline data folder ({DEFAULT_DATA})")
        command.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sparse-ce", help="BM25 runs")
        command.add_argument("--limit-queries", type=positive_int, metavar="N", help="the first N queries of each collection")
    ablate.add_argument("--depth", type=positive_int, default=DEFAULT_DEPTH, metavar="N",
                        help=f"candidates re-ranked per query (default {DEFAULT_DEPTH})")
    ablate.add_argument("--mode", choices=ABLATION_MODES, default="renormalise",
                        help="renormalise: the removed keys leave the softmax (default); zero: their weights are set "
                        "to 0 after it, as the paper does (dense backend)")
    ablate.add_argument("--sets", nargs="+", choices=ABLATION_SETS, metavar="SET",
                        help="which direction ablations run: directions (the 25 in all / lower / upper layers), groups "
                        "(every group in all three), directions-all (the 25 in all layers only); default: directions "
                        "groups, or none with --heads")
    ablate.add_argument("--heads", nargs="+", type=parse_head, metavar="L.H",
                        help="remove these attention heads together (0-based layer.head, e.g. 2.9) and score once: "
                        "heads-ablation.json and heads-ablation.md")
    ablate.add_argument("--random-heads", type=positive_int, default=0, metavar="N",
                        help="with --heads: N random draws of as many heads from the same layers, each scored")
    ablate.add_argument("--seed", type=int, default=0, help="of the random heads (default 0)")
    add_scoring_arguments(ablate)
    heads.add_argument("--per-class", type=int, default=4, metavar="N",
                       help="passages per class (relevant, hard and easy negatives) and query (default 4)")
    heads.add_argument("--max-length", type=int, default=256, help="tokens per pair (default 256)")
    heads.add_argument("--seed", type=int, default=0)
    heads.add_argument("--threads", type=positive_int, help="CPU threads")
    svd.add_argument("--heads", type=Path, help="heads.json of `analyze heads` for the same model: correlate with it")


@contextlib.contextmanager
def quiet_model_code():
    """Ablations leave the six-flag family on purpose: silence the model code's per-pattern notice (installed or
    remote code) while the command runs, and restore the levels afterwards."""
    loggers = [logging.getLogger(name) for name in ("modeling_sparse_ce", "transformers_modules")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run(args: argparse.Namespace) -> int:
    require("matplotlib", "analysis", f"sparse-ce analyze {args.analysis}")  # its figures, drawn after the work
    check_output(args.output_dir, "--output-dir", folder=True)
    with quiet_model_code():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    model_of(args, f"sparse-ce analyze {args.analysis}")
    set_threads(getattr(args, "threads", None))
    if args.analysis == "svd":
        from .svd import run_svd

        result = run_svd(_load(args.model), args.output_dir, args.heads)
        for direction, corr in result["correlation"].items():
            if corr["constant_score"]:
                print(f"{direction}: no correlation (the matching score is the same for every head)")
            else:
                print(f"{direction}: Spearman {corr['spearman']:+.3f}, Pearson {corr['pearson']:+.3f}")
        print(f"svd.json{' and svd.png' if args.heads else ''} in {args.output_dir}")
        return 0
    depth = getattr(args, "depth", 100)
    try:
        collections = [truncate(load_collection(name, args.data, args.cache_dir, depth), depth, args.limit_queries)
                       for name in args.collections]
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--collections: {error}") from error
    if args.analysis == "ablate":
        return _ablate(args, collections)
    from .heads import run_heads, sample_pairs

    model = _load(args.model)
    tokenizer = _tokenizer(args.model)
    result = run_heads(model, tokenizer, sample_pairs(collections, args.per_class, args.seed), args.output_dir, args.max_length)
    for key, field, negatives in (("ranking", "relevant_minus_easy", "easy"), ("ranking_hard", "relevant_minus_hard", "hard")):
        for direction, ranking in result[key].items():
            top = ", ".join(f"{r['layer']}/{r['head']} ({r[field]:+.3f})" for r in ranking[:5])
            print(f"{direction}: top heads (layer/head, relevant − {negatives} max attention): {top}")
    print(f"heads.json and heads-*.png in {args.output_dir}")
    return 0


def _ablate(args: argparse.Namespace, collections) -> int:
    """The direction sets (``--sets``) and, with ``--heads``, the head ablation, on one loaded model."""
    from .ablate import run_ablation
    from .directions import all_ablations
    from .head_ablation import head_draws, run_head_ablation

    if args.random_heads and not args.heads:
        raise UsageError("--random-heads: draws as many heads as --heads names; give --heads too")
    sets = args.sets or ([] if args.heads else DEFAULT_SETS)
    for collection in collections:  # every query checked before the weights load
        check_queries(args.model, collection.first_stage, args)
    scorer = make_scorer(args.model, args, progress=False)
    written = []
    try:
        if args.heads:  # a bad head is refused before any scoring
            head_draws(scorer.model, args.heads, args.random_heads, args.seed)
        if sets:
            run_ablation(scorer, collections, args.output_dir, all_ablations(sets), mode=args.mode)
            print((args.output_dir / "ablation.md").read_text())
            written += ["ablation.json", "ablation-summary.json", "ablation.md", "ablation.png"]
        if args.heads:
            run_head_ablation(scorer, collections, args.output_dir, args.heads, args.random_heads, args.seed)
            print((args.output_dir / "heads-ablation.md").read_text())
            written += ["heads-ablation.json", "heads-ablation.md"]
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(f"{', '.join(f for f in written if (args.output_dir / f).is_file())} in {args.output_dir}")
    return 0


def _load(model: str):
    """A sequence-classification model in float32 (eager attention for plain BERT, so it returns weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=True)
        options = {} if config.model_type == "sparse_ce" else {"attn_implementation": "eager"}
        return AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=True, dtype="float32", **options).eval()
    except OSError as error:
        raise UsageError(f"--model {model}: {str(error).splitlines()[0]}") from error


def _tokenizer(model: str):
    from ..rank.scoring import load_tokenizer

    return load_tokenizer(model)
