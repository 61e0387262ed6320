"""Plots drawn from a saved results.json, so anything a user sees can be redrawn from the file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy(results: dict[str, Any], path: Path) -> Path:
    """Accuracy per round, overall and for each subset of present modalities."""
    rounds = [r for r in results["rounds"] if r.get("evaluate")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["evaluate"]["accuracy"] for r in rounds], color="black", linewidth=2.5, label="all present modalities")
    subsets = sorted({s for r in rounds for s in r["evaluate"]["by_modalities"]}, key=lambda s: (s.count("+"), s))
    for subset in subsets:
        pts = [(r["round"], r["evaluate"]["by_modalities"][subset]["accuracy"]) for r in rounds if subset in r["evaluate"]["by_modalities"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linestyle="--" if "+" not in subset else "-", label=subset)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (clients' test splits)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
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
