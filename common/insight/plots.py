"""Plots drawn from a saved results.json, so anything a user sees can be redrawn from the file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MAX_LEGEND = 20  # more clients than this in the epsilon plot: thin unlabelled lines
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def plot_accuracy(results: dict[str, Any], path: Path) -> Path:
    """Pooled held-out accuracy per round, overall and for the subsets of present modalities worth showing."""
    from common.model.evaluation import OWN_MODALITIES, headline, shown_subsets

    rounds = [(r["round"], headline(r.get("evaluate"))) for r in results["rounds"] if headline(r.get("evaluate"))]
    from matplotlib.figure import Figure  # the Figure API: pyplot's global backend stays as it is

    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    ax.plot([x for x, _ in rounds], [e["accuracy"] for _, e in rounds], color="black", linewidth=2.5, label=OWN_MODALITIES)
    last = rounds[-1][1]["by_modalities"] if rounds else {}
    subsets = shown_subsets(last)
    for subset in subsets:
        pts = [(x, e["by_modalities"][subset]["accuracy"]) for x, e in rounds if subset in e["by_modalities"]]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            markersize=3,
            linestyle="--" if "+" not in subset else "-",
            label=subset,
        )
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (pooled over the clients' test splits)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    hidden = len(last) - len(subsets)
    ax.legend(
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        borderaxespad=0,
        title=f"+ {hidden} more in results.json" if hidden > 0 else None,
        title_fontsize=7,
    )
    ax.set_title("Accuracy per round, by modalities present at test time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_epsilon(results: dict[str, Any], path: Path) -> Path:
    """Cumulative epsilon per round for each client, with each client's budget.

    A round's ``epsilon`` holds the clients that answered its training; a client's spend stays where it was in the
    rounds it did not train (a step). Past :data:`MAX_LEGEND` clients the lines are thin and unlabelled."""
    from matplotlib.figure import Figure  # the Figure API: pyplot's global backend stays as it is

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    last = max((r["round"] for r in results["rounds"]), default=0)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results["rounds"]:
        for client, eps in (r.get("epsilon") or {}).items():
            if eps is not None:
                series.setdefault(client, []).append((r["round"], eps))
    many = len(series) > MAX_LEGEND
    for client, pts in sorted(series.items()):
        pts = pts + [(last, pts[-1][1])] if pts[-1][0] < last else pts  # carried to the last round
        style = {"linewidth": 0.6, "alpha": 0.5} if many else {"marker": "o", "markersize": 3, "label": client}
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], drawstyle="steps-post", **style)
        budget = results["privacy"]["clients"].get(client, {}).get("budget")
        if not many and budget is not None and math.isfinite(budget):
            ax.axhline(budget, color=line.get_color(), linestyle=":", linewidth=1)
    budgets = {c.get("budget") for c in results["privacy"]["clients"].values()} - {None}
    if many and len(budgets) == 1 and math.isfinite(b := budgets.pop()):
        ax.axhline(b, color="black", linestyle=":", linewidth=1)  # one budget shared by all
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
    return path


def contributions_figure(overall: dict[str, Any], *, width: float = 7) -> Any:
    """Bars of each modality's Shapley value for accuracy and macro-F1 (``final.modality_contributions.overall``)."""
    games = [(metric, name, overall.get(metric) or {}) for metric, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))]
    games = [g for g in games if "shapley" in g[2]]
    if not games:
        return None
    mods = list(games[0][2]["shapley"])
    values = [v for _, _, g in games for v in g["shapley"].values()]
    from matplotlib.figure import Figure  # the Figure API: pyplot's global backend stays as it is

    fig = Figure(figsize=(width, 1.2 + 0.55 * len(mods)))
    ax = fig.subplots()
    height = 0.38
    for k, (_metric, name, game) in enumerate(games):
        ys = [i + (k - 0.5) * height for i in range(len(mods))]
        vals = [game["shapley"].get(m, 0.0) for m in mods]
        err = None if game.get("exact", True) else [1.96 * game.get("stderr", {}).get(m, 0.0) for m in mods]
        ax.barh(ys, vals, height=height, xerr=err, color=COLORS[k], label=name)
        for y, v in zip(ys, vals):
            ax.text(v, y, f" {v:+.3f} ", va="center", ha="left" if v >= 0 else "right", fontsize=8.5)
    ax.set_yticks(range(len(mods)), mods)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    lo, hi = min(0.0, *values), max(0.05, *values)
    ax.set_xlim(lo - 0.2 * (hi - lo) if lo < 0 else 0, hi + 0.2 * (hi - lo))
    ax.set_xlabel(
        f"Shapley value: held-out score the modality adds over chance ({games[0][2]['empty']:.3f}), averaged over join orders"
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title("Modality contributions, final round")
    fig.tight_layout()
    return fig


def plot_contributions(results: dict[str, Any], path: Path) -> Path | None:
    """contributions.png: the final round's Shapley values, when the run has them."""
    mc = (results.get("final") or {}).get("modality_contributions") or {}
    fig = contributions_figure(mc.get("overall") or {})
    if fig is None:
        return None
    fig.savefig(path, dpi=120)
    return path


def plot_results(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Draw accuracy.png, epsilon.png and (when the run has them) contributions.png into ``out_dir``."""
    drawn = [
        plot_accuracy(results, out_dir / "accuracy.png"),
        plot_epsilon(results, out_dir / "epsilon.png"),
        plot_contributions(results, out_dir / "contributions.png"),
    ]
    return [p for p in drawn if p is not None]
