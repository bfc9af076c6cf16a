"""Choose the first-stage fusion weight (``--fuse-first-stage``) of a model on the dev set.

Scores the held-out DL21 dev queries of ``train_st.py`` (BM25 top-100) once with MODEL, then prints dev nDCG@10 of
``z(model) + W * z(BM25)`` for each W (``sparse_ce.rank.fusion``). Only the dev queries are used.

Usage: python experiments/fusion_dev.py MODEL [--weights 0 0.1 0.2 0.3 0.5 1] [--threads 2] [--output FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ir_measures  # noqa: E402
from interpolate import dev_evaluator  # noqa: E402  (experiments/interpolate.py: train_st's dev split)

import train_st  # noqa: E402
from sparse_ce.rank import PairScorer  # noqa: E402
from sparse_ce.rank.fusion import fuse_first_stage  # noqa: E402
from sparse_ce.runtime import set_threads  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="cross-encoder folder")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5, 1.0])
    parser.add_argument("--data", type=Path, default=train_st.DEFAULT_DATA)
    parser.add_argument("--dev-queries", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--output", type=Path, help="append one JSON line per weight")
    args = parser.parse_args()
    set_threads(args.threads)

    evaluator = dev_evaluator(args.data, args.dev_queries, args.max_length)
    stage = evaluator.first_stage
    qids, queries, docs = stage.pairs()
    scores, _ = PairScorer(args.model, max_length=args.max_length, progress=False).score(queries, docs, qids)
    ranking = stage.ranking(scores)
    print("| first-stage weight | dev nDCG@10 top-100 |\n|---|---|")
    for weight in args.weights:
        fused = fuse_first_stage(ranking, stage, weight)
        run = {qid: dict(hits) for qid, hits in fused.items()}
        ndcg = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], evaluator.qrels, run)[ir_measures.nDCG @ 10]
        print(f"| {weight:g} | {ndcg:.4f} |", flush=True)
        if args.output:
            with args.output.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"model": args.model, "weight": weight, "dev_ndcg@10_top100": round(ndcg, 4)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
