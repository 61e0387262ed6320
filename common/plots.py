"""Plots drawn from a saved results.json, so anything a user sees can be redrawn from the file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy(results: dict[str, Any], path: Path) -> Path:
    """Pooled held-out accuracy per round, overall and for the subsets of present modalities worth showing."""
    from common.evaluation import OWN_MODALITIES, headline, shown_subsets

    rounds = [(r["round"], headline(r.get("evaluate"))) for r in results["rounds"] if headline(r.get("evaluate"))]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot([x for x, _ in rounds], [e["accuracy"] for _, e in rounds], color="black", linewidth=2.5, label=OWN_MODALITIES)
    last = rounds[-1][1]["by_modalities"] if rounds else {}
    subsets = shown_subsets(last)
    for subset in subsets:
        pts = [(x, e["by_modalities"][subset]["accuracy"]) for x, e in rounds if subset in e["by_modalities"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linestyle="--" if "+" not in subset else "-", label=subset)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (pooled over the clients' test splits)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    hidden = len(last) - len(subsets)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0,
              title=f"+ {hidden} more in results.json" if hidden > 0 else None, title_fontsize=7)
    ax.set_title("Accuracy per round, by modalities present at test time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_epsilon(results: dict[str, Any], path: Path) -> Path:
    """Cumulative epsilon per round for each client, with each client's budget."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    clients = sorted({c for r in results["rounds"] for c in (r.get("epsilon") or {})})
    for client in clients:
        pts = [(r["round"], r["epsilon"][client]) for r in results["rounds"] if (r.get("epsilon") or {}).get(client) is not None]
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=client)
            budget = results["privacy"]["clients"].get(client, {}).get("budget")
            if budget is not None and math.isfinite(budget):
                ax.axhline(budget, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (dotted: budget)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a non-private run has no epsilon to plot
        ax.legend(fontsize=8, loc="upper left")
    delta = results.get("config", {}).get("dp.delta")
    ax.set_title(f"Privacy spend per client (δ = {delta:g})" if isinstance(delta, float) else "Privacy spend per client")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_results(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Draw accuracy.png and epsilon.png into ``out_dir``."""
    return [plot_accuracy(results, out_dir / "accuracy.png"), plot_epsilon(results, out_dir / "epsilon.png")]
