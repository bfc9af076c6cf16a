"""Tables and figures of the matching-mechanism analysis: the ablation table laid out like the paper's Table 1 (and
the groups with Kendall's tau), the head-ablation table, 5x5 Δ-nDCG@10 heatmaps per layer range, layers x heads
heatmaps and the SVD scatter plot.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604), Table 1 and Figures 2-4.
"""

from __future__ import annotations

from pathlib import Path

from configuration_sparse_ce import SEGMENT_NAMES

from .directions import LABELS, LAYER_RANGES, layers_of

ALPHA = 0.05


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cell(record: dict) -> str:
    star = "*" if record["p_holm"] < ALPHA else ""
    if record["unchanged"]:
        return f"{record['ndcg@10']:.3f} (off)"
    return f"{record['ndcg@10']:.3f} ({record['delta']:+.3f}){star}"


def _tau(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def ablation_markdown(records: list[dict], summary: dict) -> str:
    """One 5x5 table per layer range that has directions (rows attend, columns are attended), then the groups: by
    layer range, then one row each with Kendall's tau."""
    layers = summary["num_layers"]
    lines = [(
        f"Unablated model: nDCG@10 {summary['ndcg@10']:.3f} over {summary['queries']} queries "
        f"({', '.join(summary['collections'])}, top-{summary['depth']} re-ranked; Kendall's τ to BM25's order "
        f"{_tau(summary.get('tau_bm25'))}). Cells: nDCG@10 with the direction removed (Δ to the unablated model); "
        "* Holm-corrected paired t-test p < 0.05; (off): the model's own pattern already lacks the direction in those "
        "layers, so nothing changes."
    )]
    singles = {(r["from"], r["to"], r["layers"]): r for r in records if "group" not in r}
    for scope in (s for s in LAYER_RANGES if any(k[2] == s for k in singles)):
        span = layers_of(scope, layers)
        lines += ["", f"**{scope} layers** ({span[0]}-{span[-1]}): row attends to column", ""]
        lines.append("| attends to → | " + " | ".join(LABELS[b] for b in SEGMENT_NAMES) + " |")
        lines.append("|---" * (len(SEGMENT_NAMES) + 1) + "|")
        for a in SEGMENT_NAMES:
            cells = [_cell(singles[(a, b, scope)]) if (a, b, scope) in singles else "–" for b in SEGMENT_NAMES]
            lines.append(f"| {LABELS[a]} | " + " | ".join(cells) + " |")
    groups = [r for r in records if "group" in r]
    if groups:
        lines += ["", "| group | " + " | ".join(f"{scope} layers" for scope in LAYER_RANGES) + " |",
                  "|---" * (len(LAYER_RANGES) + 1) + "|"]
        for name in dict.fromkeys(r["group"] for r in groups):
            by_scope = {r["layers"]: r for r in groups if r["group"] == name}
            lines.append(f"| {name} | " + " | ".join(_cell(by_scope[s]) if s in by_scope else "–" for s in LAYER_RANGES) + " |")
        lines += ["", ("Groups with Kendall's τ (mean over queries) of the ablated ranking to BM25's order and to the "
                       "unablated model's:"), "", "| group | layers | nDCG@10 | Δ | τ vs BM25 | τ vs unablated |",
                  "|---|---|---|---|---|---|"]
        for r in groups:
            star = "*" if r["p_holm"] < ALPHA else ""
            lines.append(f"| {r['group']} | {r['layers']} | {r['ndcg@10']:.3f} | {r['delta']:+.3f}{star} | "
                         f"{_tau(r['tau_bm25'])} | {_tau(r['tau_base'])} |")
    return "\n".join(lines)


def heads_ablation_markdown(result: dict) -> str:
    """The named heads and the random draws' Δ range, with Kendall's tau."""
    base, named, drawn = result["unablated"], result["named"], result["random"]
    lines = [
        (f"Unablated model: nDCG@10 {base['ndcg@10']:.3f} over {base['queries']} queries "
         f"({', '.join(base['collections'])}, top-{base['depth']} re-ranked; Kendall's τ to BM25's order "
         f"{_tau(base['tau_bm25'])}). Heads are layer.head, 0-based; p: paired t-test against the unablated model."),
        "", "| heads removed | nDCG@10 | Δ | p | τ vs BM25 | τ vs unablated |", "|---|---|---|---|---|---|",
    ]
    for label, r in [(", ".join(named["heads"]), named)] + [(f"random {i}: {', '.join(r['heads'])}", r)
                                                          for i, r in enumerate(drawn["draws"])]:
        lines.append(f"| {label} | {r['ndcg@10']:.3f} | {r['delta']:+.3f} | {r['p']:.3g} | {_tau(r['tau_bm25'])} | "
                     f"{_tau(r['tau_base'])} |")
    if drawn["draws"]:
        n = len(drawn["draws"])
        lines += ["", (f"Random heads ({n} draws, seed {result['seed']}; per layer as many as named, none named): "
                       f"Δ mean {drawn['delta_mean']:+.3f}, min {drawn['delta_min']:+.3f}, max {drawn['delta_max']:+.3f}; "
                       f"{named['random_at_least_as_damaging']} of {n} did at least as much damage as the named heads "
                       f"(empirical p {named['empirical_p']:.3g}).")]
    return "\n".join(lines)


def ablation_heatmap(records: list[dict], summary: dict, path: Path) -> None:
    """5x5 Δ nDCG@10 per layer range (rows attend, columns are attended); no file when no single direction ran."""
    singles = {(r["from"], r["to"], r["layers"]): r for r in records if "group" not in r}
    scopes = [s for s in LAYER_RANGES if any(k[2] == s for k in singles)]
    if not scopes:
        return
    plt = _pyplot()
    deltas = [r["delta"] for r in singles.values()] or [0.0]
    limit = max(abs(min(deltas)), abs(max(deltas)), 1e-3)
    fig, axes = plt.subplots(1, len(scopes), figsize=(4.2 * len(scopes) + 1.2, 4.4), squeeze=False)
    for panel, (ax, scope) in enumerate(zip(axes[0], scopes)):
        grid = [[singles[(a, b, scope)]["delta"] if (a, b, scope) in singles else float("nan") for b in SEGMENT_NAMES]
                for a in SEGMENT_NAMES]
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit)
        for i, a in enumerate(SEGMENT_NAMES):
            for j, b in enumerate(SEGMENT_NAMES):
                record = singles.get((a, b, scope))
                if record is not None:
                    text = "off" if record["unchanged"] else f"{record['delta']:+.2f}" + ("*" if record["p_holm"] < ALPHA else "")
                    ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(5), [LABELS[b] for b in SEGMENT_NAMES], rotation=45, ha="right")
        ax.set_yticks(range(5), [LABELS[a] for a in SEGMENT_NAMES] if panel == 0 else [])
        ax.set_xlabel("attended (keys)")
        if panel == 0:
            ax.set_ylabel("attending (rows)")
        ax.set_title(f"{scope} layers")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="Δ nDCG@10")
    fig.suptitle(f"Ablating one direction (unablated nDCG@10 {summary['ndcg@10']:.3f})")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def heads_heatmap(difference: list[list[float]], title: str, path: Path, label: str) -> None:
    """Layers x heads heatmap of a per-head statistic (relevant minus easy negatives)."""
    plt = _pyplot()
    limit = max(max(abs(v) for row in difference for v in row), 1e-6)
    fig, ax = plt.subplots(figsize=(0.45 * len(difference[0]) + 2.5, 0.45 * len(difference) + 1.5))
    image = ax.imshow(difference, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(len(difference[0])))
    ax.set_yticks(range(len(difference)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def svd_scatter(panels: list[tuple[str, list[float], list[float], float]], path: Path) -> None:
    """One scatter per panel: (title, alignment per head, matching score per head, Spearman rho)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4), squeeze=False)
    for panel, (ax, (title, alignment, score, rho)) in enumerate(zip(axes[0], panels)):
        ax.scatter(alignment, score, s=14)
        ax.set_xlabel("SVD alignment Σσ(u·v)/Σσ")
        if panel == 0:
            ax.set_ylabel("matching score: max attention, relevant − easy")
        rho_text = "undefined (the score is constant)" if rho != rho else f"{rho:+.2f}"
        ax.set_title(f"{title}\nSpearman ρ = {rho_text}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
