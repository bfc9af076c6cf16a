"""Why a weak re-ranker hurts over the BM25 top-100 but not over the top-15: where its top-10 comes from.

For each model, the held-out dev queries' BM25 top-100 is re-ranked, and the script reports nDCG@10 at depth 15 and
100, and of the re-ranked top-10 at depth 100: the share promoted from BM25 ranks 16-100 and, of those, the share
judged relevant (grade >= 2), judged non-relevant, and unjudged. Dev queries only (never a test set).

Usage: python experiments/depth_diagnosis.py NAME=MODEL [NAME=MODEL ...] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ir_measures

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_ce.data import read_qrels  # noqa: E402
from sparse_ce.rank import PairScorer  # noqa: E402
from sparse_ce.runtime import set_threads  # noqa: E402
from sparse_ce.train.pool import dev_split, read_grades, read_training_pool  # noqa: E402
from train_st import default_sources, dev_first_stage, parse_args  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="NAME=MODEL")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    set_threads()
    qrels_path = args.data / "trec-dl" / "qrels.dl21-passage.txt"
    grades = read_grades([qrels_path])
    dev = dev_split(read_training_pool(default_sources(args.data)), grades, 20)
    stage = dev_first_stage(parse_args(["--output", "-", "--data", str(args.data)]), dev)
    qrels = [q for q in read_qrels(qrels_path) if q.query_id in set(dev)]
    qids, queries, docs = stage.pairs()
    print("| model | nDCG@10 top-15 | nDCG@10 top-100 | top-10 from BM25 ranks 16-100 | of those: relevant / "
          "non-relevant / unjudged |\n|---|---|---|---|---|")
    for spec in args.models:
        name, _, model = spec.partition("=")
        scores, _ = PairScorer(model, progress=False, dtype="float32").score(queries, docs, qids)
        ranking = stage.ranking(scores)
        values = []
        for depth in (15, 100):
            run = {q: dict(hits[:depth]) for q, hits in ranking.items()}
            values.append(ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrels, run)[ir_measures.nDCG @ 10])
        promoted, relevant, non_relevant = 0, 0, 0
        for qid, hits in ranking.items():
            bm25_rank = {docid: r for r, (docid, _) in enumerate(hits, 1)}
            top = sorted(hits, key=lambda h: -h[1])[:10]
            deep = [d for d, _ in top if bm25_rank[d] > 15]
            promoted += len(deep)
            relevant += sum(grades[qid].get(d, -1) >= 2 for d in deep)
            non_relevant += sum(grades[qid].get(d, -1) in (0, 1) for d in deep)
        total = 10 * len(ranking)
        unjudged = promoted - relevant - non_relevant
        print(f"| {name} | {values[0]:.4f} | {values[1]:.4f} | {promoted / total:.0%} | "
              f"{relevant / max(promoted, 1):.0%} / {non_relevant / max(promoted, 1):.0%} / "
              f"{unjudged / max(promoted, 1):.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
