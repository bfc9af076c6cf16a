"""DL19 + DL20 quality of trained MixEncoders against the dual encoder with each one's own weights (paired t-test,
the difference detectable with 80% power, TOST within ±0.02): docs/precompute.md's quality table.

Usage: python experiments/mixencoder_quality.py --models models/mix26/k1-C ... --output docs/precompute/quality-26.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ce.precompute.quality import paired_comparison, per_query_quality  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    for folder in args.models:
        if folder.name in results:
            continue
        start = time.perf_counter()
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        quality = per_query_quality(model, AutoTokenizer.from_pretrained(folder, trust_remote_code=True), args.data)
        training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").exists() else {}
        results[folder.name] = {
            "model": str(folder), "config": {k: getattr(model.config, k) for k in (
                "num_context", "context_strategy", "interaction_layers", "interaction_block", "dual_encoder_start",
                "ablation")},
            "steps": training.get("steps"), "dev": training.get("dev"),
            "blend": [layer.blend.tolist() for layer in model.interaction if getattr(layer, "blend", None) is not None],
            "vs_dual_encoder": paired_comparison(quality["mixencoder"], quality["dual-encoder"]),
            "per_query": quality, "seconds": round(time.perf_counter() - start, 1),
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1) + "\n")
        c = results[folder.name]["vs_dual_encoder"]
        print(f"{folder.name}: {c['system']:.4f} vs dual {c['baseline']:.4f} (delta {c['delta']:+.4f}, p {c['p']:.3f}, "
              f"detectable {c['detectable_at_80']:.3f}, TOST p {c['tost_p']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
