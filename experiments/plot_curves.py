"""Learning curves of ``train_st.py`` runs: dev nDCG@10 (held-out DL21 queries) against training wall-clock.

Usage: python experiments/plot_curves.py OUT.png NAME=RUN_FOLDER [NAME=RUN_FOLDER ...] [--depth 100] [--title T]
Each run folder holds the ``learning_curve.jsonl`` that ``train_st.py`` appends to at every dev evaluation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_curve(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "learning_curve.jsonl").read_text().splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("runs", nargs="+", metavar="NAME=FOLDER")
    parser.add_argument("--depths", type=int, nargs="+", default=[100], help="dev re-ranking depths to draw")
    parser.add_argument("--x", choices=["seconds", "steps"], default="seconds")
    parser.add_argument("--reference", action="append", default=[], metavar="NAME=VALUE",
                        help="horizontal line, e.g. BM25=0.4106")
    parser.add_argument("--title", default="dev nDCG@10 (held-out DL21 queries, BM25 top-100 re-ranked)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, spec in enumerate(args.runs):
        name, _, folder = spec.partition("=")
        curve = read_curve(Path(folder))
        xs = [r["train_seconds"] / 60 if args.x == "seconds" else r["step"] for r in curve]
        for depth in args.depths:
            key = f"dev_ndcg@10_top{depth}"
            deepest = depth == max(args.depths)
            ax.plot(xs, [r[key] for r in curve], "-" if deepest else ":", marker="o", markersize=2.5,
                    color=colors[number % len(colors)], label=name if deepest else None)
    if len(args.depths) > 1:
        ax.plot([], [], "k-", label=f"solid: top-{max(args.depths)}")
        ax.plot([], [], "k:", label=f"dotted: top-{min(args.depths)}")
    for spec in args.reference:
        name, _, value = spec.partition("=")
        ax.axhline(float(value), color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(name, (0, float(value)), fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("training wall-clock (min, 2 CPU cores)" if args.x == "seconds" else "steps")
    ax.set_ylabel("nDCG@10")
    ax.set_title(args.title, fontsize=8, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
