"""Ship the Table-1 sparse w=4 model (Schlatt et al., ECIR 2024 pattern) as the repository's default model folder.

Copies the trained folder (float16 safetensors, remote code, tokenizer), rewrites its model card with the model's own
name and the controlled Table-1 comparison, and records the scores of a handful of TREC DL 2019 pairs
(``recorded_scores.json``), which CI recomputes from the shipped weights.

Usage: python experiments/ship_default.py [--src models/table1/sparse-w4] [--dst models/sparse-ce-minilm-l6-w4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_ce.data import read_dl_json  # noqa: E402
from sparse_ce.rank import PairScorer  # noqa: E402
from sparse_ce.train.output import write_card  # noqa: E402

MAX_MB = 50
SKIP = {"README.md", "training.json", "runs", "trainer", "eval"}  # regenerated or not shipped


def record_scores(folder: Path, data: Path, queries: int = 2, passages: int = 4) -> dict:
    """Scores of the first ``passages`` BM25 passages of the first ``queries`` DL19 queries, float32 on CPU."""
    stage = read_dl_json(data / "trec-dl" / "bm25_top100_dl19.json", limit=queries)
    rows = [(qid, stage.queries[qid], c.docid, c.text) for qid, hits in stage.candidates.items() for c in hits[:passages]]
    scorer = PairScorer(str(folder), device="cpu", dtype="float32", progress=False)
    scores, _ = scorer.score([r[1] for r in rows], [r[3] for r in rows], [r[0] for r in rows])
    return {
        "dtype": "float32", "device": "cpu", "max_length": scorer.max_length,
        "pairs": [{"qid": q, "query": t, "docid": d, "passage": p, "score": s} for (q, t, d, p), s in zip(rows, scores)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT / "models" / "table1" / "sparse-w4")
    parser.add_argument("--dst", type=Path, default=ROOT / "models" / "sparse-ce-minilm-l6-w4")
    parser.add_argument("--table", type=Path, default=ROOT / "models" / "table1" / "eval" / "results.md")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--note", action="append", default=[], help="a Markdown paragraph for the card (repeatable)")
    args = parser.parse_args()

    if args.dst.exists():
        shutil.rmtree(args.dst)
    args.dst.mkdir(parents=True)
    for item in args.src.iterdir():
        if item.is_file() and item.name not in SKIP:
            shutil.copy2(item, args.dst / item.name)
    record = json.loads((args.src / "training.json").read_text())
    (args.dst / "training.json").write_text(json.dumps(record, indent=2) + "\n")

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.dst, trust_remote_code=True)
    extra = list(args.note)
    if args.table.is_file():
        extra += ["## Table 1, controlled (this package, `experiments/table1.sh`)",
                 "Every pattern trained with the same recipe, init, data, budget and seed (docs/training.md); "
                 "nDCG@10 against full attention with a paired TOST (bound ±0.02).", args.table.read_text().strip()]
    write_card(args.dst, config, record, args.dst.name, extra)
    (args.dst / "recorded_scores.json").write_text(json.dumps(record_scores(args.dst, args.data), indent=1) + "\n")
    size = sum(f.stat().st_size for f in args.dst.iterdir()) / 2**20
    if size > MAX_MB:
        raise SystemExit(f"{args.dst}: {size:.1f} MB, over the {MAX_MB} MB budget for a folder in the repository")
    print(f"shipped {args.src} -> {args.dst} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
