"""Pick the distillation teacher on the dev set: nDCG@10 of candidate (fused) teachers re-ranking the BM25 top-100 of
the held-out judged DL21 queries (the same split as ``train_st.py``; never DL19/DL20).

Usage: python experiments/pick_teacher.py [--data ../shared/data] [--teacher SPEC ...] [--output docs/teacher-dev.json]
Each ``--teacher`` is a ``+``-joined list of ``SPEC[*WEIGHT]`` components (see ``sparse_ce.train.teacher``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ir_measures

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_ce.data import read_dl_json, read_qrels  # noqa: E402
from sparse_ce.runtime import set_threads  # noqa: E402
from sparse_ce.train.pool import TrainingQuery, dev_split, read_grades, read_training_pool  # noqa: E402
from sparse_ce.train.teacher import TeacherSpec, teacher_scores  # noqa: E402
from train_st import MPNET_SCORES, default_init, default_sources  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--dev-queries", type=int, default=20)
    parser.add_argument("--teacher", nargs="+", help="candidate teachers (default: MiniLM, mpnet and fusions)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sparse-ce")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    set_threads()
    mpnet, minilm = f"scores:{args.data}/{MPNET_SCORES}", default_init()
    candidates = args.teacher or [
        "bm25", minilm, mpnet, f"{mpnet}+bm25*0.3", f"{mpnet}+bm25*0.5", f"{mpnet}+{minilm}*0.5",
        f"{mpnet}+{minilm}*0.5+bm25*0.3",
    ]
    grades = read_grades([args.data / "trec-dl" / "qrels.dl21-passage.txt"])
    dev = dev_split(read_training_pool(default_sources(args.data)), grades, args.dev_queries)
    stage = read_dl_json(args.data / "trec-dl" / "bm25_top100_dl21.json")
    pool = {q: TrainingQuery(stage.queries[q], {c.docid: c.text for c in stage.candidates[q]}) for q in dev}
    qrels = [q for q in read_qrels(args.data / "trec-dl" / "qrels.dl21-passage.txt") if q.query_id in set(dev)]
    results = {}
    for candidate in candidates:
        specs = [TeacherSpec.parse(part) for part in candidate.split("+")]
        scores = teacher_scores(specs, pool, args.cache_dir / "teacher-dev")
        value = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrels, scores)[ir_measures.nDCG @ 10]
        name = " + ".join(str(s) for s in specs).replace(mpnet, "all-mpnet-base-v2").replace(minilm, "all-MiniLM-L6-v2")
        results[name] = round(float(value), 4)
        print(f"{results[name]:.4f}  {name}", flush=True)
    if args.output:
        args.output.write_text(json.dumps({"dev_queries": dev, "ndcg@10_bm25_top100": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
