"""The run report: one self-contained HTML page drawn from a run folder (results.json, run.json, ledgers).

Inline CSS and inline SVG charts only: no script, no font, no image file, nothing fetched (a
Content-Security-Policy meta tag forbids any request), so the page opens from the file anywhere.
Every figure comes from the run folder; the privacy part is :func:`common.privacy.audit.audit_path`'s verdict.
Parts the run does not have (per-class counts, attention, a second evaluation) are left out.
"""

from __future__ import annotations

import datetime
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import FedfuseError
from common.insight.contributions import METRICS, class_scores, modality_contributions, subset_figures
from common.insight.plots import COLORS, contributions_figure

REPORT_FILE = "report.html"
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}  # as the page names them
CLASS_METRIC_NAMES = {"accuracy": "recall", "macro_f1": "F1"}
MAX_SUBSET_LINES = 8  # per-round charts: single modalities, the full set, then the best others up to this many

CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#dde2ea; --soft:#f5f7fa; --accent:#2456a6;
        --ok:#1e7d43; --warn:#a15c00; --bad:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
       color:var(--ink); background:#eef1f5; }
main { max-width:1120px; margin:0 auto; padding:24px 20px 60px; }
header.top { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px; margin-bottom:18px; }
h1 { font-size:22px; margin:0 0 4px; } h1 code { font-size:18px; color:var(--muted); }
h2 { font-size:18px; margin:0 0 10px; padding-bottom:6px; border-bottom:2px solid var(--soft); }
h3 { font-size:15px; margin:18px 0 6px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px; margin-bottom:18px; }
p { margin:6px 0; } .muted { color:var(--muted); } .small { font-size:13px; }
nav { margin-top:10px; font-size:13px; } nav a { color:var(--accent); margin-right:14px; text-decoration:none; }
.badge { display:inline-block; padding:1px 9px; border-radius:999px; font-size:12px; font-weight:600;
         vertical-align:middle; border:1px solid currentColor; }
.ok { color:var(--ok); } .warn { color:var(--warn); } .bad { color:var(--bad); }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin-top:14px; }
.card { flex:1 1 150px; background:var(--soft); border-radius:8px; padding:10px 14px; }
.card .v { font-size:22px; font-weight:650; } .card .k { font-size:12px; color:var(--muted); }
table { border-collapse:collapse; width:100%; margin:6px 0 10px; font-size:13.5px; }
th, td { padding:5px 9px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:var(--soft); font-weight:600; }
td:first-child, .nw { white-space:nowrap; }
td.n, th.n { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr.problem td { background:#fff6ec; }
.top1 { font-weight:700; }
.note { background:#fff6ec; border-left:4px solid var(--warn); padding:8px 12px; border-radius:4px; margin:8px 0; }
.error { background:#fdecea; border-left:4px solid var(--bad); padding:8px 12px; border-radius:4px; margin:8px 0; }
.chart svg { width:100%; height:auto; display:block; }
.bar { position:relative; background:var(--soft); border-radius:3px; height:10px; min-width:90px; margin-top:4px; }
.bar > span { position:absolute; left:0; top:0; bottom:0; border-radius:3px; background:var(--accent); }
.bar.over > span { background:var(--bad); }
table.cm { width:auto; } .cm th { white-space:nowrap; }
.cm td { min-width:46px; text-align:center; padding:3px 6px; font-variant-numeric:tabular-nums; border:1px solid #fff; }
.cms { display:flex; flex-wrap:wrap; gap:18px; } .cms > div { flex:1 1 300px; }
details summary { cursor:pointer; color:var(--accent); }
code { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:0.92em; }
"""


# --- loading ------------------------------------------------------------------------------------


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(results.json, run.json)`` of a run folder; FedfuseError saying what is missing."""
    results_file = run_dir / "results.json"
    if not run_dir.is_dir():
        raise FedfuseError(f"{run_dir} is not a folder; give a run folder (the --out of `fedfuse simulate`)")
    if not results_file.is_file():
        raise FedfuseError(f"{run_dir} has no results.json: not a fedfuse run folder, or the run wrote no round yet")
    try:
        results = json.loads(results_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FedfuseError(f"{results_file} is not valid JSON ({exc}); the report needs an intact results.json") from None
    run_file = run_dir / "run.json"
    run = {}
    if run_file.is_file():
        try:
            run = json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            run = {}
    return results, run


def _audit(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The audit's JSON per client, or an explanation of why the audit could not run."""
    from common.privacy.audit import audit_path

    try:
        report = audit_path(run_dir)
    except Exception as exc:  # noqa: BLE001  (the report shows any audit failure instead of failing)
        return {}, f"the ledger audit could not run: {exc}"
    return report.to_json()["clients"], None


# --- small formatting helpers -------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    if math.isinf(value):
        return "∞"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def signed(value: Any, digits: int = 3) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:+.{digits}f}"


def table(
    header: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Sequence[int] = (), row_classes: Sequence[str] | None = None
) -> str:
    """An HTML table; cells are HTML already (escape them first); columns in ``numeric`` right-aligned."""
    head = "".join(f'<th class="n">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>" for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        body.append(
            f"<tr{cls}>"
            + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
            + "</tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def svg(fig: Any) -> str:
    """A matplotlib figure as inline SVG (text drawn as paths: no font to fetch)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "fedfuse-report"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg") :], flags=re.S)  # creator, date
    return f'<div class="chart">{text}</div>'


def _subset_order(subsets: Iterable[str]) -> list[str]:
    return sorted(set(subsets), key=lambda s: (s.count("+"), s))


def _chart_subsets(final: Mapping[str, float], modalities: Sequence[str]) -> list[str]:
    """Single modalities, the full set, then the best-scoring other subsets, up to MAX_SUBSET_LINES."""
    ordered = _subset_order(final)
    full = "+".join(m for m in modalities if any(m in s.split("+") for s in ordered))
    keep = [s for s in ordered if "+" not in s] + ([full] if full in final and "+" in full else [])
    others = sorted((s for s in ordered if s not in keep), key=lambda s: -final[s])
    return _subset_order(keep + others[: max(0, MAX_SUBSET_LINES - len(keep))])


# --- sections -----------------------------------------------------------------------------------


def _header(results: Mapping[str, Any], run: Mapping[str, Any], run_dir: Path) -> str:
    config = results.get("config") or {}
    status = results.get("status", "unknown")
    cls = {"completed": "ok", "running": "warn"}.get(status, "bad")
    rounds = results.get("rounds") or []
    planned = config.get("num-server-rounds")
    _, final, source = subset_figures(results.get("final") or {})
    pooled = source == "pooled"
    clients = (results.get("privacy") or {}).get("clients") or {}
    eps = [c.get("epsilon") for c in clients.values()]
    finite = [e for e in eps if isinstance(e, (int, float))]
    max_eps = "∞" if any(e is None for e in eps) and clients else (num(max(finite), 2) if finite else "–")
    cards = [
        ("status", f'<span class="{cls}">{esc(status)}</span>'),
        ("rounds", f"{len(rounds)} / {esc(planned if planned is not None else '?')}"),
        ("clients", str(len(clients))),
        ("held-out accuracy" + (" (pooled)" if pooled else ""), num(final.get("accuracy"))),
        ("held-out macro-F1" + (" (pooled)" if pooled else ""), num(final.get("macro_f1"))),
        ("largest ε spent", max_eps),
    ]
    created = run.get("created")
    facts = [
        f"dataset <code>{esc(config.get('data.dataset', '?'))}</code>",
        f"fusion <code>{esc(config.get('model.fusion', '?'))}</code>",
        f"strategy <code>{esc(config.get('strategy', '?'))}</code>",
        f"encoders <code>{esc(config.get('encoders', '?'))}</code>",
        "budget "
        + (
            "ε = ∞ (non-private)"
            if config.get("dp.epsilon") is None
            else f"(ε = {num(config.get('dp.epsilon'), 2)}, δ = {esc(config.get('dp.delta'))}) per client"
        ),
    ]
    error = results.get("error")
    collapse = ((results.get("final") or {}).get("modality_contributions") or {}).get("warnings") or []
    notes = "".join(
        f'<div class="note"><b>Warning</b>{_round_of(w)}: {esc(w.get("message") if isinstance(w, Mapping) else w)}</div>'
        for w in [*(results.get("warnings") or []), *collapse]
    )
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [
            ("scores", "held-out scores"),
            ("contributions", "modality contributions"),
            ("confusion", "confusion matrices"),
            ("clients", "clients and privacy"),
            ("rounds", "rounds"),
            ("config", "configuration"),
        ]
    )
    return (
        f'<header class="top"><h1>fedfuse run <code>{esc(results.get("run_id", "?"))}</code> '
        f'<span class="badge {cls}">{esc(status)}</span></h1>'
        f'<p class="muted small">{esc(run_dir.resolve())}' + (f" · started {esc(created)}" if created else "") + "</p>"
        f'<p class="small">{" · ".join(facts)}</p>'
        + (f'<div class="error"><b>The run failed:</b> {esc(error)}</div>' if error else "")
        + notes
        + '<div class="cards">'
        + "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{esc(k)}</div></div>' for k, v in cards)
        + "</div>"
        + f"<nav>{nav}</nav></header>"
    )


def _round_of(warning: Any) -> str:
    return f" (round {esc(warning['round'])})" if isinstance(warning, Mapping) and warning.get("round") is not None else ""


def _scores(results: Mapping[str, Any], modalities: Sequence[str]) -> str:
    rounds = [r for r in results.get("rounds") or [] if r.get("evaluate")]
    out = ['<section id="scores"><h2>Held-out scores per round, by modalities present at test time</h2>']
    if not rounds:
        return (
            out[0] + '<p class="muted">No round was evaluated (evaluation off, <code>release.eval-metrics = false</code>, '
            "or the run stopped before its first evaluation).</p></section>"
        )
    by, overall, source = subset_figures(rounds[-1]["evaluate"])
    how = (
        "pooled over every held-out prediction"
        if source == "pooled"
        else "the mean of the clients’ own scores, weighted by their test examples"
    )
    out.append(
        '<p class="small muted">For a subset S the global model sees only the modalities in S, on the held-out '
        f"samples that have all of them. Figures: {how}. Black line: every sample with the modalities it has.</p>"
    )
    final_acc = {s: f["accuracy"] for s, f in by.items() if isinstance(f.get("accuracy"), (int, float))}
    shown = _chart_subsets(final_acc, modalities)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.9))
    axes = fig.subplots(1, 2)
    xs = [r["round"] for r in rounds]
    figures = [subset_figures(r["evaluate"]) for r in rounds]
    for ax, metric in zip(axes, METRICS):
        ax.plot(xs, [f[1].get(metric) for f in figures], color="black", linewidth=2.4, label="each sample's own modalities")
        for i, subset in enumerate(shown):
            pts = [(x, (f[0].get(subset) or {}).get(metric)) for x, f in zip(xs, figures)]
            pts = [p for p in pts if p[1] is not None]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                markersize=3.5,
                color=COLORS[i % len(COLORS)],
                linestyle="--" if "+" not in subset else "-",
                label=subset,
            )
        ax.set_title(f"held-out {METRIC_NAMES[metric]}", fontsize=11)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if len(xs) < 12:
            ax.set_xticks(xs)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.1 if len(names) <= 5 else 0.16, 1, 1))
    out.append(svg(fig))
    if len(final_acc) > len(shown):
        out.append(
            f'<p class="small muted">The chart shows {len(shown)} of {len(final_acc)} subsets; the table has them all.</p>'
        )
    rows = [
        [
            "<b>each sample’s own modalities</b>",
            num(overall.get("accuracy")),
            num(overall.get("macro_f1")),
            num(overall.get("num_examples")),
        ]
    ]
    for subset in _subset_order(by):
        f = by[subset]
        rows.append([esc(subset), num(f.get("accuracy")), num(f.get("macro_f1")), num(f.get("num_examples"))])
    out.append(f"<h3>Final scores, round {esc(rounds[-1]['round'])}</h3>")
    out.append(table(["modalities at test time", "accuracy", "macro-F1", "examples"], rows, numeric=(1, 2, 3)))
    return "".join(out) + "</section>"


def _contribution_bars(overall: Mapping[str, Any]) -> str | None:
    fig = contributions_figure(overall, width=11)
    return None if fig is None else svg(fig)


def _contributions_over_rounds(results: Mapping[str, Any], modalities: Sequence[str], labels: Sequence[str]) -> str | None:
    points: dict[str, list[tuple[int, float]]] = {}
    for r in results.get("rounds") or []:
        ev = r.get("evaluate")
        if not ev:
            continue
        mc = ev.get("modality_contributions") or modality_contributions(ev, modalities=modalities, labels=labels)
        for m, v in ((mc.get("overall") or {}).get("accuracy") or {}).get("shapley", {}).items():
            points.setdefault(m, []).append((r["round"], v))
    if not points or max(len(p) for p in points.values()) < 2:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 3.0))
    ax = fig.subplots()
    for i, (m, pts) in enumerate(points.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3.5, color=COLORS[i % len(COLORS)], label=m)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("Shapley value (accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return svg(fig)


def _class_table(per_class: Mapping[str, Any], metric: str, modalities: Sequence[str]) -> str:
    rows = []
    for label, game in per_class.get(metric, {}).items():
        if "shapley" not in game:
            rows.append([esc(label)] + ["–"] * len(modalities) + [esc(game.get("error", ""))])
            continue
        top = max(game["shapley"].values())  # bold: the largest value (every one of them on a tie)
        rows.append(
            [esc(label)]
            + [
                f'<span class="top1">{signed(game["shapley"][m])}</span>'
                if abs(game["shapley"].get(m, -math.inf) - top) < 1e-9
                else signed(game["shapley"].get(m))
                for m in modalities
            ]
            + [num(game["full"])]
        )
    header = ["class"] + list(modalities) + [f"{CLASS_METRIC_NAMES[metric]} with all"]
    return table(header, rows, numeric=tuple(range(1, len(modalities) + 2)))


def _contributions(results: Mapping[str, Any], modalities: Sequence[str], labels: Sequence[str]) -> str:
    out = ['<section id="contributions"><h2>Modality contributions</h2>']
    final = results.get("final")
    if not final:
        return out[0] + '<p class="muted">No held-out evaluation: nothing to attribute.</p></section>'
    mc = final.get("modality_contributions") or modality_contributions(final, modalities=modalities, labels=labels)
    overall = mc.get("overall") or {}
    chance = mc.get("empty_value")
    out.append(
        '<p class="small">How much of the final model’s held-out score each modality brings. The value of a set S of '
        "modalities is the score with only S visible; with none visible it is "
        f"{esc(mc.get('empty_value_means', 'chance level'))} ({num(chance)}). A modality’s <b>Shapley value</b> is the score it adds "
        "when it joins, averaged over every order in which the modalities could join; the values add up to the score "
        "with every modality minus chance. A pair’s <b>interaction</b> is positive when the two are worth more together "
        "than apart (each tells apart what the other cannot) and negative when they are redundant. "
        f"Source: {esc(mc.get('source', '?'))} held-out figures.</p>"
    )
    for warning in mc.get("warnings") or []:
        out.append(f'<div class="note"><b>Warning:</b> {esc(warning)}</div>')
    acc, f1 = overall.get("accuracy") or {}, overall.get("macro_f1") or {}
    if "shapley" not in acc:
        out.append(
            f'<div class="note">No attribution for the federation: {esc(acc.get("error", "no per-subset scores"))}. '
            "Per-client attributions below use each client’s own subsets.</div>"
        )
    else:
        bars = _contribution_bars(overall)
        if bars:
            out.append(bars)
        if not acc.get("exact", True):
            out.append(
                '<p class="small muted">More modalities than the exact computation covers: values estimated from '
                "random join orders; error bars are ±1.96 standard errors (about 95 % confidence).</p>"
            )
        attention = mc.get("attention") or {}
        gain = acc["full"] - acc["empty"]
        rows = []
        for m in acc["shapley"]:
            weights = list((attention.get(m) or {}).values())
            rows.append(
                [
                    f"<b>{esc(m)}</b>",
                    num(acc.get("alone", {}).get(m)),
                    signed(acc["shapley"][m]),
                    f"{acc['shapley'][m] / gain:.0%}" if gain > 1e-12 else "–",
                    signed((f1.get("shapley") or {}).get(m)),
                ]
                + ([num(sum(weights) / len(weights)) if weights else "–"] if attention else [])
            )
        out.append(
            table(
                ["modality", "accuracy alone", "Shapley (accuracy)", "share of gain", "Shapley (macro-F1)"]
                + (["mean attention weight"] if attention else []),
                rows,
                numeric=(1, 2, 3, 4, 5),
            )
        )
        out.append(
            f'<p class="small muted">Accuracy with every modality: {num(acc["full"])}; chance: {num(acc["empty"])}.'
            + (
                " Mean attention weight: over held-out samples with two or more modalities, averaged over classes."
                if attention
                else ""
            )
            + "</p>"
        )
        pairs = acc.get("interactions") or {}
        if pairs:
            rows = []
            for pair, v in pairs.items():
                vf = (f1.get("interactions") or {}).get(pair)
                reading = "cooperate" if v > 0.01 else ("redundant" if v < -0.01 else "independent")
                rows.append([esc(pair.replace("+", " × ")), signed(v), signed(vf), reading])
            out.append("<h3>Interactions between pairs</h3>")
            out.append(table(["pair", "accuracy", "macro-F1", "reading"], rows, numeric=(1, 2)))
    over_rounds = _contributions_over_rounds(results, modalities, labels)
    if over_rounds:
        out.append("<h3>Shapley values (accuracy) over the rounds</h3>" + over_rounds)
    per_class = mc.get("per_class")
    if per_class:
        present = [m for m in modalities if any(m in (g.get("shapley") or {}) for g in per_class.get("accuracy", {}).values())]
        out.append("<h3>Per class: Shapley values of the class’s recall</h3>")
        out.append('<p class="small muted">Bold: the modality that contributes most to telling that class apart.</p>')
        out.append(_class_table(per_class, "accuracy", present))
        out.append(
            "<details><summary>Per class: Shapley values of the class’s F1</summary>"
            + _class_table(per_class, "macro_f1", present)
            + "</details>"
        )
    else:
        out.append('<p class="small muted">Per-class contributions need per-class counts in results.json; this run has none.</p>')
    attention = mc.get("attention")
    if attention:
        mods = [m for m in modalities if m in attention]
        rows = []
        for label in labels:
            ws = {m: attention[m].get(label) for m in mods}
            best = max((m for m in mods if ws[m] is not None), key=lambda m: ws[m], default=None)
            rows.append([esc(label)] + [f'<span class="top1">{num(ws[m])}</span>' if m == best else num(ws[m]) for m in mods])
        out.append("<h3>Attention fusion: mean attention weight per class</h3>")
        out.append(
            '<p class="small muted">Over held-out samples of the class with two or more modalities present '
            "(a modality’s weight where it is present).</p>"
        )
        out.append(table(["class"] + mods, rows, numeric=tuple(range(1, len(mods) + 1))))
    clients = mc.get("clients") or {}
    if clients:
        rows = []
        for cid, games in clients.items():
            game = games.get("accuracy") or {}
            if "shapley" in game:
                parts = ", ".join(f"{esc(m)} {signed(v)}" for m, v in game["shapley"].items())
                inter = ", ".join(
                    f"{esc(p.replace('+', ' × '))} {signed(v)}" for p, v in (game.get("interactions") or {}).items()
                )
                rows.append([esc(cid), esc("+".join(game["modalities"])), parts, inter or "–", num(game["full"])])
            else:
                rows.append(
                    [
                        esc(cid),
                        esc("+".join(game.get("modalities", []))),
                        f'<span class="muted">{esc(game.get("error", ""))}</span>',
                        "–",
                        "–",
                    ]
                )
        out.append("<h3>Per client, over the modalities each client holds (accuracy)</h3>")
        out.append(table(["client", "modalities", "Shapley values", "interactions", "accuracy with all"], rows, numeric=(4,)))
    return "".join(out) + "</section>"


def _confusion(results: Mapping[str, Any], modalities: Sequence[str], labels: Sequence[str]) -> str:
    by, overall_figures, _ = subset_figures(results.get("final") or {})
    matrices = {s: f["confusion"] for s, f in by.items() if isinstance(f, Mapping) and isinstance(f.get("confusion"), list)}
    if isinstance(overall_figures.get("confusion"), list):
        matrices = {"each sample’s own modalities": overall_figures["confusion"], **matrices}
    recall = class_scores(by, len(labels))["accuracy"]
    head = '<section id="confusion"><h2>Confusion matrices and per-class recall</h2>'
    if not matrices and not recall:
        return head + '<p class="muted">This run’s results.json has no per-class counts, so no confusion matrix.</p></section>'
    out = [head]
    if matrices:
        full = "+".join(modalities)
        shown = [s for s in matrices if s.startswith("each") or "+" not in s or s == full][:8]
        short = [esc(lab[:10]) for lab in labels]
        blocks = []
        for subset in shown:
            m = matrices[subset]
            rows = []
            for i, row in enumerate(m):
                total = sum(row) or 1
                cells = []
                for j, v in enumerate(row):
                    a = v / total
                    color = f"rgba(36,86,166,{a:.2f})" if i == j else f"rgba(179,38,30,{min(1.0, a * 1.6):.2f})"
                    ink = "#fff" if a > 0.55 else "#1d2330"
                    cells.append(f'<td style="background:{color};color:{ink}">{v}</td>')
                rows.append(f"<tr><th>{short[i] if i < len(short) else i}</th>{''.join(cells)}</tr>")
            header = "".join(f"<th>{c}</th>" for c in short[: len(m)])
            blocks.append(
                f'<div><h3>{esc(subset)}</h3><table class="cm"><tr><th>true ↓ / predicted →</th>{header}</tr>'
                f"{''.join(rows)}</table></div>"
            )
        out.append(
            '<p class="small muted">Final round, held-out counts; rows: true class, columns: predicted. Blue: the '
            "share of the row predicted right; red: confusions.</p>" + f'<div class="cms">{"".join(blocks)}</div>'
        )
    if recall:
        subsets = _subset_order(s for s in by if any(frozenset(s.split("+")) in per for per in recall))
        if len(subsets) > MAX_SUBSET_LINES:
            final_acc = {s: by[s].get("accuracy", 0.0) for s in subsets}
            subsets = _chart_subsets(final_acc, modalities)
        rows = []
        for c, label in enumerate(labels):
            values = {s: recall[c].get(frozenset(s.split("+"))) for s in subsets}
            rows.append([esc(label)] + [num(values[s]) for s in subsets])
        out.append("<h3>Recall per class, by modalities present at test time</h3>")
        out.append(table(["class"] + subsets, rows, numeric=tuple(range(1, len(subsets) + 1))))
    return "".join(out) + "</section>"


def _clients(results: Mapping[str, Any], audit: Mapping[str, Any], audit_error: str | None) -> str:
    privacy = (results.get("privacy") or {}).get("clients") or {}
    tested = (results.get("final") or {}).get("clients") or {}
    ids = sorted(set(privacy) | set(audit) | set(tested))
    out = ['<section id="clients"><h2>Clients and privacy</h2>']
    if audit_error:
        out.append(f'<div class="error">{esc(audit_error)}</div>')
    rows, classes = [], []
    for cid in ids:
        p, a, t = privacy.get(cid) or {}, audit.get(cid) or {}, tested.get(cid) or {}
        eps, budget = p.get("epsilon", a.get("epsilon")), p.get("budget", a.get("budget"))
        private = a.get("private", eps is not None)
        if not private or eps is None:
            spend = "ε = ∞ (non-private)" if p or a else "–"
            bar = ""
        else:
            spend = f'<span class="nw">(ε = {eps:.2f}, δ = {esc(p.get("delta", a.get("delta")))})</span>'
            frac = eps / budget if isinstance(budget, (int, float)) and budget > 0 else 0
            bar = f'<div class="bar{" over" if frac > 1 else ""}"><span style="width:{min(frac, 1) * 100:.1f}%"></span></div>'
        budget_text = "∞" if budget is None else num(budget, 2)
        if a:
            verdict = '<span class="ok">verified</span>' if a.get("ok") else f'<span class="bad">{esc(a.get("status"))}</span>'
            if a.get("recomputed_epsilon") is not None:
                verdict += f'<div class="small muted nw">recomputed ε = {a["recomputed_epsilon"]:.2f}</div>'
            if a.get("problems"):
                verdict += "".join(f'<div class="small bad">{esc(x)}</div>' for x in a["problems"][:5])
        else:
            verdict = '<span class="muted">no ledger</span>'
        status = p.get("status", "–")
        rounds = str(p.get("rounds_trained", a.get("rounds", 0)))
        extra = [f"{a[k]} {w}" for k, w in (("refused_rounds", "refused"), ("discarded_rounds", "discarded")) if a.get(k)]
        rows.append(
            [
                f"<b>{esc(cid)}</b>",
                esc("+".join(p.get("modalities") or a.get("modalities") or [])),
                num(p.get("train_examples")),
                num(t.get("num_examples")),
                rounds + (f' <span class="small muted">({", ".join(extra)})</span>' if extra else ""),
                spend + bar,
                budget_text,
                esc(status),
                verdict,
            ]
        )
        classes.append("problem" if (a and not a.get("ok")) or str(status).startswith("excluded") else "")
    if rows:
        out.append(
            table(
                [
                    "client",
                    "modalities",
                    "train examples",
                    "test examples",
                    "rounds trained",
                    "privacy spend",
                    "budget ε",
                    "status",
                    "ledger audit",
                ],
                rows,
                numeric=(2, 3, 4),
                row_classes=classes,
            )
        )
        out.append(
            '<p class="small muted">Privacy spend: each client’s cumulative (ε, δ) over its whole history; bar: '
            "spend against budget. Ledger audit: <code>fedfuse audit</code>’s verdict on the run folder’s ledgers "
            "(signatures, hash chain, client and federation copies, ε re-accounted independently).</p>"
        )
    else:
        out.append('<p class="muted">No client took part.</p>')
    return "".join(out) + "</section>"


def _who(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"<b>{esc(k)}</b>: {_reason(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_reason(v) for v in value)
    return esc(value)


def _reason(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(esc(v) if k in ("reason", "message", "status") else f"{esc(k)} {esc(v)}" for k, v in value.items())
    return esc(value)


def _rounds(results: Mapping[str, Any]) -> str:
    rows, classes = [], []
    for r in results.get("rounds") or []:
        tr = r.get("train") or {}
        ev = r.get("evaluate") or {}
        trained = tr.get("trained") or []
        refused, rejected, failed = tr.get("refused") or {}, tr.get("rejected") or {}, tr.get("failed") or []
        rows.append(
            [
                str(r.get("round")),
                f"{len(trained)} / {tr.get('sampled', 0)}",
                _who(refused) or "–",
                _who(rejected) or "–",
                _who(failed) or "–",
                num(subset_figures(ev)[1].get("accuracy")) if ev else "–",
                num(r.get("max_epsilon"), 2),
                num(r.get("seconds"), 1),
            ]
        )
        classes.append("problem" if refused or rejected or failed else "")
    head = '<section id="rounds"><h2>Rounds</h2>'
    if not rows:
        return head + '<p class="muted">No round completed.</p></section>'
    return (
        head + '<p class="small muted">Refused: a client declined to train (budget exhausted, site policy, a round '
        "already trained, a diverged round); rejected: the server refused a reply it could not trust; failed: the "
        "client raised or did not answer in time.</p>"
        + table(
            ["round", "trained / sampled", "refused", "rejected", "failed", "accuracy", "max ε", "seconds"],
            rows,
            numeric=(0, 1, 5, 6, 7),
            row_classes=classes,
        )
        + "</section>"
    )


def _config(results: Mapping[str, Any]) -> str:
    config = results.get("config") or {}
    rows = [[f"<code>{esc(k)}</code>", esc("∞ / unset" if v is None else v)] for k, v in sorted(config.items())]
    return (
        '<section id="config"><h2>Configuration</h2><details><summary>All run-config keys '
        f"({len(rows)})</summary>{table(['key', 'value'], rows)}</details></section>"
    )


def render(run_dir: str | Path) -> str:
    """The report page of the run in ``run_dir`` (HTML text)."""
    run_dir = Path(run_dir)
    results, run = load_run(run_dir)
    federation = results.get("federation") or {}
    by, overall, _ = subset_figures(results.get("final") or {})
    modalities = list(federation.get("modalities") or sorted({m for s in by for m in s.split("+")}))
    labels = list(federation.get("labels") or overall.get("labels") or [])
    if not labels:
        raise FedfuseError(
            f"{run_dir / 'results.json'} names no class labels (its 'federation' entry is missing); was it written by fedfuse?"
        )
    audit, audit_error = _audit(run_dir)
    title = f"fedfuse run {results.get('run_id', '')} – {results.get('status', '')}"
    generated = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    body = "".join(
        [
            _header(results, run, run_dir),
            _scores(results, modalities),
            _contributions(results, modalities, labels),
            _confusion(results, modalities, labels),
            _clients(results, audit, audit_error),
            _rounds(results),
            _config(results),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f'<body><main>{body}<p class="small muted">Drawn from the run folder’s results.json and ledgers by '
        f"<code>fedfuse report</code>, {esc(generated)}.</p></main></body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report page (default ``<run_dir>/report.html``, replaced atomically); return its path."""
    from common.fileio import atomic_write_bytes

    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    atomic_write_bytes(path, render(run_dir).encode("utf-8"))
    return path
