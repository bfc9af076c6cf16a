"""docs/precompute's Table 4 figure and tables from two runs: the timing of `sparse-ce bench --precomputed
--no-quality` (untrained MixEncoders: time does not depend on the weights) and the quality of the trained models of
experiments/mixencoder_table3.sh (experiments/mixencoder_quality.py), plus other models' quality for the
cross-encoders (docs/precompute/quality.json), labelled as such.

Usage: python experiments/mixencoder_report.py TIMING.json QUALITY.json OUT_DIR [--pair mixencoder-k1=k1-C ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ce.precompute.bench import markdown, plot  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timing", type=Path)
    parser.add_argument("quality", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pair", nargs="+", default=["mixencoder-k1=k1-C"], metavar="SYSTEM=MODEL",
                        help="timed system = trained model whose quality it gets (the dual encoder gets the first's)")
    parser.add_argument("--other", type=Path, default=Path("docs/precompute/quality.json"))
    args = parser.parse_args()
    results = json.loads(args.timing.read_text())
    quality = json.loads(args.quality.read_text())
    other = json.loads(args.other.read_text())
    systems = results["systems"]
    for number, pair in enumerate(args.pair):
        system, model = pair.split("=")
        per_query = quality[model]["per_query"]
        systems[system]["quality"] = {c: sum(v.values()) / len(v) for c, v in per_query["mixencoder"].items()}
        systems[system]["vs_dual_encoder"] = quality[model]["vs_dual_encoder"]
        systems[system]["quality_model"] = quality[model]["model"]
        if number == 0:
            systems["dual-encoder"]["quality"] = {c: sum(v.values()) / len(v) for c, v in per_query["dual-encoder"].items()}
            systems["dual-encoder"]["quality_model"] = f"{quality[model]['model']} (as a dual encoder)"
    for name, entry in other.items():
        if name in systems:
            systems[name]["quality"] = {c: entry[c] for c in ("dl19", "dl20")}
            systems[name]["quality_of_other_model"] = True
            results.setdefault("quality_source", {})[name] = entry["source"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precomputed.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "precomputed.md").write_text(markdown(results))
    plot(results, args.out / "precomputed.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
