"""The main job's speed: ``sparse-ce rerank`` of the DL19 BM25 top-100 (43 x 100 pairs) against sentence-transformers'
``CrossEncoder.predict`` on a plain BERT holding the same weights, over the same pairs, each as a whole process, in
float32 and in bfloat16 (``sparse-ce rerank``'s default ``--dtype auto`` on CPUs with bfloat16 arithmetic).

Usage: python experiments/main_job_speed.py [--model models/sparse-ce-minilm-l6-w4] [--data ../shared/data]
Run it on a quiet machine; it prints pairs per second of both and their ratio (also as JSON with --output).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREDICT = """
import sys, time, torch
from sentence_transformers import CrossEncoder
from sparse_ce.data import read_dl_json
stage = read_dl_json(sys.argv[2])
_, queries, docs = stage.pairs()
model = CrossEncoder(sys.argv[1], device="cpu", model_kwargs={"dtype": getattr(torch, sys.argv[3])})
start = time.perf_counter()
model.predict(list(zip(queries, docs)), show_progress_bar=False)
print("predict seconds", time.perf_counter() - start, len(queries))
"""


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "sparse-ce-minilm-l6-w4")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    dl19 = args.data / "trec-dl" / "bm25_top100_dl19.json"
    qrels = args.data / "trec-dl" / "qrels.dl19-passage.txt"
    sparse_ce = str(Path(sys.executable).parent / "sparse-ce")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        from sparse_ce.bench.rank import plain_bert_copy

        plain = plain_bert_copy(args.model, Path(tmp) / "bert")
        for dtype in ("float32", "bfloat16"):
            seconds, out = timed([sparse_ce, "rerank", "--model", str(args.model), "--dl-json", str(dl19), "--qrels",
                                  str(qrels), "--output", str(Path(tmp) / "run"), "--no-progress", "--dtype", dtype])
            predict_seconds, predict_out = timed([sys.executable, "-c", PREDICT, str(plain), str(dl19), dtype])
            pairs = int(predict_out.split()[-1])
            result[dtype] = {
                "sparse-ce rerank": {"seconds": round(seconds, 1), "pairs_per_s": round(pairs / seconds, 1)},
                "CrossEncoder.predict, plain BERT": {"seconds": round(predict_seconds, 1),
                                                     "pairs_per_s": round(pairs / predict_seconds, 1)},
                "speed-up": round(predict_seconds / seconds, 2),
                "rerank summary": [line for line in out.splitlines() if "pairs/s" in line or "nDCG" in line],
            }
    result["pairs"] = pairs
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
