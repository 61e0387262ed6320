"""Modality contributions across a benchmark's runs: each setting's Shapley values, interactions and
per-class values (``common/insight/contributions.py``), as mean ± sample std over its seeds; tables and a plot.

Each run's figures are read from its results.json (``<source>.modality_contributions``, where
``source`` is ``final``: the clients' held-out data, or ``final_server_evaluate``: the server's test
sites); a results.json written before fedfuse computed them gets them computed from the same entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.bench import _common as C

ROUND_KEYS = {"final": "evaluate", "final_server_evaluate": "server_evaluate"}  # results' final entry -> round key
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
CLASS_METRIC_NAMES = {"accuracy": "recall", "macro_f1": "F1"}


def run_contributions(results: Mapping[str, Any], source: str = "final") -> dict[str, Any] | None:
    """``results[source].modality_contributions`` (computed from that entry when absent); None without the entry."""
    from common.insight.contributions import modality_contributions

    if source not in ROUND_KEYS:
        raise ValueError(f"source must be one of {', '.join(ROUND_KEYS)}, got '{source}'")
    evaluation = results.get(source)
    if not evaluation:
        return None
    found = evaluation.get("modality_contributions")
    if found is None:
        federation = results.get("federation") or {}
        found = modality_contributions(
            evaluation, modalities=federation.get("modalities") or [], labels=federation.get("labels") or []
        )
    return found


def warned_rounds(results: Mapping[str, Any], source: str = "final") -> list[int]:
    """The rounds whose held-out figures (of ``source``'s kind) raised a unimodal-collapse warning."""
    key = ROUND_KEYS[source]
    return [
        r["round"]
        for r in results.get("rounds") or []
        if ((r.get(key) or {}).get("modality_contributions") or {}).get("warnings")
    ]


def _stat(values: Sequence[float]) -> dict[str, Any]:
    mean, std = C.mean_std(values)
    return {"mean": mean, "std": std, "values": list(values)}


def aggregate_game(games: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One attribution (``{"modalities", "full", "empty", "alone", "shapley", "interactions"}``) over several
    runs: each figure's mean, std and values. A modality or pair is averaged over the runs that have it;
    runs whose attribution failed (an ``error``) are counted and their reasons kept."""
    ok = [g for g in games if isinstance(g.get("shapley"), Mapping)]
    errors = sorted({str(g.get("error", "no attribution")) for g in games if g not in ok})
    if not ok:
        return {"runs": 0, "failed": len(games), "errors": errors}
    modalities = list(dict.fromkeys(m for g in ok for m in g["modalities"]))
    pairs = list(dict.fromkeys(p for g in ok for p in g.get("interactions", {})))
    shares = {
        m: [g["shapley"][m] / (g["full"] - g["empty"]) for g in ok if m in g["shapley"] and g["full"] - g["empty"] > 1e-12]
        for m in modalities
    }
    out: dict[str, Any] = {
        "modalities": modalities,
        "runs": len(ok),
        "empty": ok[0]["empty"],
        "full": _stat([g["full"] for g in ok]),
        "alone": {m: _stat([g["alone"][m] for g in ok if m in g.get("alone", {})]) for m in modalities},
        "shapley": {m: _stat([g["shapley"][m] for g in ok if m in g["shapley"]]) for m in modalities},
        "share": {m: _stat(v) for m, v in shares.items() if v},
        "interactions": {p: _stat([g["interactions"][p] for g in ok if p in g["interactions"]]) for p in pairs},
    }
    if errors:
        out |= {"failed": len(games) - len(ok), "errors": errors}
    return out


def aggregate(runs: Mapping[str, Mapping[str, Any]], source: str = "final") -> dict[str, Any] | None:
    """The modality contributions of one setting's runs (run name -> results.json: its seeds), aggregated; None
    when no run has the entry.

    ``{"runs", "source", "empty_value", "overall": {metric: game}, "per_class": {metric: {label: game}},
    "clients": {client: {metric: game}}, "attention": {modality: {label: stat}}, "warnings": {...}}``
    with each game as :func:`aggregate_game` returns it.
    """
    from common.insight.contributions import METRICS

    found = [(name, r, mc) for name, r in runs.items() if (mc := run_contributions(r, source)) is not None]
    if not found:
        return None
    entries = [mc for _, _, mc in found]
    out: dict[str, Any] = {
        "runs": len(entries),
        "source": source,
        "figures": entries[0].get("source"),
        "empty_value": entries[0].get("empty_value"),
        "empty_value_means": entries[0].get("empty_value_means"),
        "overall": {m: aggregate_game([(mc.get("overall") or {}).get(m) or {} for mc in entries]) for m in METRICS},
    }
    labels = list(dict.fromkeys(label for mc in entries for label in ((mc.get("per_class") or {}).get("accuracy") or {})))
    if labels:
        out["per_class"] = {
            m: {
                label: aggregate_game([g for mc in entries if (g := ((mc.get("per_class") or {}).get(m) or {}).get(label))])
                for label in labels
            }
            for m in METRICS
        }
    clients = sorted({c for mc in entries for c in mc.get("clients") or {}})
    if clients:
        out["clients"] = {
            c: {
                m: aggregate_game([g for mc in entries if (g := ((mc.get("clients") or {}).get(c) or {}).get(m))])
                for m in METRICS
            }
            for c in clients
        }
    attention = [mc["attention"] for mc in entries if mc.get("attention")]
    if attention:
        out["attention"] = {
            m: {label: _stat([a[m][label] for a in attention if label in a.get(m, {})]) for label in attention[0][m]}
            for m in attention[0]
        }
    out["warnings"] = {
        "final": sorted({w for mc in entries for w in mc.get("warnings") or []}),
        "runs_warned_final": sum(1 for mc in entries if mc.get("warnings")),
        "rounds_warned": {name: rounds for name, r, _ in found if (rounds := warned_rounds(r, source))},
    }
    return out


def by_setting(
    runs: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Sequence[str]], source: str | Mapping[str, str] = "final"
) -> dict[str, dict[str, Any]]:
    """``{setting: aggregate(...)}`` for ``settings`` (setting -> its run names); ``source`` per setting or for all."""
    out = {}
    for key, names in settings.items():
        src = source if isinstance(source, str) else source[key]
        found = aggregate({n: runs[n] for n in names if n in runs}, src)
        if found is not None:
            out[key] = found
    return out


# --- tables ---------------------------------------------------------------------------------------


def pm(stat: Mapping[str, Any] | None, *, signed: bool = True, scale: float = 100.0) -> str:
    """``+30.1 ± 1.2``: a stat's mean ± std in points (``+30.1`` from a single run; ``-`` when missing)."""
    if not stat or stat.get("mean") is None or math.isnan(stat["mean"]):
        return "-"
    mean = f"{stat['mean'] * scale:+.1f}" if signed else f"{stat['mean'] * scale:.1f}"
    return mean if len(stat.get("values") or []) < 2 else f"{mean} ± {stat['std'] * scale:.1f}"


def overall_table(rows: Sequence[tuple[str, Mapping[str, Any]]], metric: str = "accuracy") -> str:
    """One row per setting: the score with every modality, each modality's score alone and its Shapley value,
    each pair's interaction, the collapse warnings, the seeds (percent points, mean ± std over seeds)."""
    games = [(label, agg, (agg.get("overall") or {}).get(metric) or {}) for label, agg in rows]
    modalities = list(dict.fromkeys(m for _, _, g in games for m in g.get("modalities", [])))
    pairs = list(dict.fromkeys(p for _, _, g in games for p in g.get("interactions", {})))
    name = METRIC_NAMES[metric]
    header = [
        "setting",
        f"{name}, all modalities",
        *[f"{m} alone" for m in modalities],
        *[f"Shapley {m}" for m in modalities],
        *[f"interaction {p}" for p in pairs],
        "collapse warnings (final / any round)",
        "seeds",
    ]
    body = []
    for label, agg, g in games:
        if not g.get("runs"):
            body.append([label, "-", *["-"] * (2 * len(modalities) + len(pairs)), _warnings(agg), "; ".join(g.get("errors", []))])
            continue
        body.append(
            [
                label,
                pm(g["full"], signed=False),
                *[pm(g["alone"].get(m), signed=False) for m in modalities],
                *[pm(g["shapley"].get(m)) for m in modalities],
                *[pm(g["interactions"].get(p)) for p in pairs],
                _warnings(agg),
                str(g["runs"]),
            ]
        )
    return C.markdown_table(header, body)


def _warnings(agg: Mapping[str, Any]) -> str:
    w = agg.get("warnings") or {}
    return f"{w.get('runs_warned_final', 0)} / {len(w.get('rounds_warned') or {})} of {agg.get('runs', 0)}"


def class_table(agg: Mapping[str, Any], metric: str = "accuracy") -> str:
    """Per class: each modality's Shapley value for the class's recall (F1), the pair interactions, the score with
    every modality, and the modality the class leans on (largest mean Shapley value, with its share of the gain)."""
    per_class = (agg.get("per_class") or {}).get(metric) or {}
    modalities = list(dict.fromkeys(m for g in per_class.values() for m in g.get("modalities", [])))
    pairs = list(dict.fromkeys(p for g in per_class.values() for p in g.get("interactions", {})))
    name = CLASS_METRIC_NAMES[metric]
    body = []
    for label, g in per_class.items():
        if not g.get("runs"):
            body.append([label, *["-"] * (len(modalities) + len(pairs) + 1), "; ".join(g.get("errors", []))])
            continue
        body.append(
            [
                label,
                *[pm(g["shapley"].get(m)) for m in modalities],
                *[pm(g["interactions"].get(p)) for p in pairs],
                pm(g["full"], signed=False),
                leans_on(g),
            ]
        )
    return C.markdown_table(
        [
            "class",
            *[f"Shapley {m}" for m in modalities],
            *[f"interaction {p}" for p in pairs],
            f"{name}, all modalities",
            "leans on",
        ],
        body,
    )


def leans_on(game: Mapping[str, Any]) -> str:
    """The modality with the largest mean Shapley value and its mean share of the gain over chance (``gyro (71 %)``);
    ``acc = gyro`` on a tie, ``none`` when no modality adds anything (the class is not recognised)."""
    shapley = {m: s["mean"] for m, s in (game.get("shapley") or {}).items() if s.get("mean") is not None}
    if not shapley or max(shapley.values()) <= 1e-9:
        return "none" if shapley else "-"
    best = max(shapley.values())
    top = [m for m, v in shapley.items() if best - v < 1e-9]
    if len(top) > 1:
        return " = ".join(top)
    share = ((game.get("share") or {}).get(top[0]) or {}).get("mean")
    return top[0] if share is None or math.isnan(share) else f"{top[0]} ({100 * share:.0f} %)"


def warnings_text(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The distinct unimodal-collapse warnings of the final rounds, by setting, or a line saying there were none."""
    lines = [f"- {label}: {w}" for label, agg in rows for w in (agg.get("warnings") or {}).get("final", [])]
    return "\n".join(lines) if lines else "No run raised a unimodal-collapse warning in its final round."


# --- plot -----------------------------------------------------------------------------------------


def plot(
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    path: Path,
    *,
    per_class: tuple[str, Mapping[str, Any]] | None = None,
    metric: str = "accuracy",
    title: str = "Modality contributions",
) -> Path | None:
    """Bars of each setting's Shapley values and interactions (mean, error bar: std over seeds); with ``per_class``,
    a second panel with that setting's per-class values (recall). None when no setting has an attribution."""
    from matplotlib.figure import Figure

    from common.insight.plots import COLORS

    games = [(label, (agg.get("overall") or {}).get(metric) or {}) for label, agg in rows]
    games = [(label, g) for label, g in games if g.get("runs")]
    if not games:
        return None
    classes = ((per_class[1].get("per_class") or {}).get(metric) or {}) if per_class else {}
    classes = {k: g for k, g in classes.items() if g.get("runs")}
    fig = Figure(figsize=(11 if classes else 7, 0.9 + 0.5 * max(len(games), len(classes) * 0.8, 3)))
    axes = fig.subplots(1, 2 if classes else 1, squeeze=False)[0]
    _bars(axes[0], games, COLORS)
    axes[0].set_title(f"{title}: Shapley value ({METRIC_NAMES[metric]})", fontsize=10)
    if classes:
        _bars(axes[1], list(classes.items()), COLORS)
        axes[1].set_title(f"per class, {per_class[0]} ({CLASS_METRIC_NAMES[metric]})", fontsize=10)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 4), fontsize=8.5, frameon=False
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _bars(ax: Any, games: Sequence[tuple[str, Mapping[str, Any]]], colors: Sequence[str]) -> None:
    """Horizontal bars: per row, one bar per modality and one (hatched) per pair interaction; error bar = std."""
    series = list(dict.fromkeys(m for _, g in games for m in g["modalities"]))
    pairs = list(dict.fromkeys(p for _, g in games for p in g.get("interactions", {})))
    n = len(series) + len(pairs)
    height = 0.8 / n
    for k, key in enumerate([*series, *pairs]):
        interaction = k >= len(series)
        stats = [(g["interactions"] if interaction else g["shapley"]).get(key) for _, g in games]
        ys = [i + (k - (n - 1) / 2) * height for i in range(len(games))]
        ax.barh(
            ys,
            [s["mean"] if s else 0.0 for s in stats],
            height=height,
            xerr=[s["std"] if s else 0.0 for s in stats],
            color="white" if interaction else colors[k % len(colors)],
            edgecolor="dimgray" if interaction else None,
            hatch="//" if interaction else None,
            label=f"interaction {key}" if interaction else key,
            error_kw={"lw": 0.8},
        )
    ax.set_yticks(range(len(games)), [label for label, _ in games], fontsize=8.5)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("held-out score over chance (mean ± std over seeds)", fontsize=8.5)
    ax.grid(axis="x", alpha=0.3)
