"""Compiled FlexAttention over a real re-ranking run: recompiles, time and scores against another backend.

Re-ranks the BM25 top-k of TREC DL 2019 (the shipped w=4 model by default) through ``PairScorer`` twice, with the
``flex`` backend (``torch.compile(flex_attention, dynamic=True)``) and with a reference backend (default the CPU
``kernel``), and prints: graphs compiled and recompiles (dynamo counters), wall time of each run (the first flex
forward includes its compile), the largest |score difference| and nDCG@10 of both runs. Issue 22: the recompiles must
stay bounded over batches of every length.

Usage: python experiments/flex_rerank.py [--model DIR] [--queries N] [--depth K] [--dtype float32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_ce.data import read_dl_json, read_qrels  # noqa: E402
from sparse_ce.rank import PairScorer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "sparse-ce-minilm-l6-w4"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--queries", type=int, default=None, help="first N DL19 queries (default: all 43)")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reference", default="kernel", help="backend to compare with (default: kernel)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import ir_measures
    from torch._dynamo.utils import counters

    stage = read_dl_json(args.data / "trec-dl" / "bm25_top100_dl19.json", limit=args.queries)
    qrels = read_qrels(args.data / "trec-dl" / "qrels.dl19-passage.txt")
    rows = [(qid, stage.queries[qid], c.docid, c.text) for qid, hits in stage.candidates.items() for c in hits[:args.depth]]
    result = {"pairs": len(rows), "queries": len(stage.candidates), "dtype": args.dtype, "threads": args.threads}
    scores = {}
    for backend in ("flex", args.reference):
        scorer = PairScorer(args.model, device="cpu", dtype=args.dtype, attention_backend=backend, progress=False)
        forwards, shapes = [0], set()
        forward = scorer.model.forward

        def counted(*a, _forward=forward, **kw):
            forwards[0] += 1
            shapes.add(tuple((kw.get("input_ids") if "input_ids" in kw else a[0]).shape))
            return _forward(*a, **kw)

        scorer.model.forward = counted
        before = dict(counters["stats"])
        start = time.perf_counter()
        scores[backend], stats = scorer.score([r[1] for r in rows], [r[3] for r in rows], [r[0] for r in rows])
        result[f"{backend}_seconds"] = round(time.perf_counter() - start, 1)
        if backend == "flex":
            result["forwards"], result["distinct_input_shapes"] = forwards[0], len(shapes)
            result["graphs_compiled"] = counters["stats"]["unique_graphs"] - before.get("unique_graphs", 0)
            result["recompiles"] = max(result["graphs_compiled"] - 1, 0)
        run = {}
        for (qid, _, docid, _), score in zip(rows, scores[backend]):
            run.setdefault(qid, {})[docid] = score
        measure = ir_measures.nDCG @ 10
        result[f"{backend}_ndcg@10"] = round(ir_measures.calc_aggregate([measure], qrels, run)[measure], 4)
    result["max_abs_score_difference"] = max(abs(a - b) for a, b in zip(scores["flex"], scores[args.reference]))
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
