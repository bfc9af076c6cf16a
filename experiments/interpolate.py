"""Choose a weight interpolation of two checkpoints on the dev set (WiSE-FT, Wortsman et al., CVPR 2022).

For each ``alpha`` builds ``(1 - alpha) * START + alpha * END`` (``sparse_ce.train.interpolate``) under
``OUTPUT/alpha-<alpha>`` and re-ranks the held-out DL21 dev queries of ``train_st.py`` (same split, BM25 top-100),
printing nDCG@10 per alpha and appending it to ``OUTPUT/interpolation.jsonl``; each folder's ``training.json``
gets its own dev figures. Only the dev queries are used: the choice never sees a test collection.

Usage: python experiments/interpolate.py START END --output DIR [--alphas 0 0.25 0.5 0.75 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_st  # noqa: E402
from sparse_ce.runtime import set_threads  # noqa: E402
from sparse_ce.train.dev import DevRerankingEvaluator  # noqa: E402
from sparse_ce.train.interpolate import interpolate  # noqa: E402


def dev_evaluator(data: Path, dev_queries: int, max_length: int) -> DevRerankingEvaluator:
    """The dev evaluator of ``train_st.py`` with its defaults (pool, qrels, split, depths)."""
    args = train_st.parse_args(["--output", "-", "--data", str(data), "--dev-queries", str(dev_queries),
                                "--max-length", str(max_length)])
    _, _, qrels, dev_ids = train_st.training_pool(args)
    return train_st.dev_evaluator(args, dev_ids, qrels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("start", type=Path, help="the earlier checkpoint (alpha = 0)")
    parser.add_argument("end", type=Path, help="the later checkpoint (alpha = 1)")
    parser.add_argument("--output", type=Path, required=True, help="folder for one model per alpha")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--data", type=Path, default=train_st.DEFAULT_DATA)
    parser.add_argument("--dev-queries", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    set_threads(args.threads)

    from sentence_transformers.cross_encoder import CrossEncoder

    evaluator = dev_evaluator(args.data, args.dev_queries, args.max_length)
    print("| alpha | dev nDCG@10 top-15 | dev nDCG@10 top-100 |\n|---|---|---|")
    for alpha in args.alphas:
        folder = interpolate(args.start, args.end, alpha, args.output / f"alpha-{alpha:g}")
        model = CrossEncoder(str(folder), trust_remote_code=True, max_length=args.max_length)
        metrics = evaluator(model)
        dev = {k: round(v, 4) for k, v in metrics.items()}
        record = json.loads((folder / "training.json").read_text())
        record["dev"] = dev
        (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        with (args.output / "interpolation.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"start": str(args.start), "end": str(args.end), "alpha": alpha, **dev}) + "\n")
        print(f"| {alpha:g} | {dev['dev_ndcg@10_top15']:.4f} | {dev['dev_ndcg@10_top100']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
