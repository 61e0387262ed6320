"""``fedfuse bench av-digits``: AV-Digits (FSDD spoken digits paired with MNIST images), six speakers as clients
holding different modalities; accuracy by the modalities present at test time, against single-modality baselines.

Cells, each run once per seed, all with the scenario's budget and training schedule:

- ``mixed``: clients in site order (sites sort by name) hold image, image, audio, audio, audio+image,
  audio+image (``data.assignment = "groups"``);
- ``image-only`` and ``audio-only``: every client holds only that modality (the baselines).

Figures come from results' ``final.pooled.by_modalities``: each client scores the model on its own test takes
(0-4), with only the named modalities visible, over the test samples that have them; the counts are pooled.
Each federation's modality contributions are aggregated over its seeds from the same figures, with a row per
mixed-federation client that holds both modalities (``_contributions.py``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from simulations.bench import _common as C
from simulations.bench import _contributions as K

MIXED_GROUPS = "image;image;audio;audio;audio+image;audio+image"
BASELINES = {"image-only": "image", "audio-only": "audio"}
SUBSETS = ("image", "audio", "audio+image")
FUSION_GAIN = 0.02  # both modalities >= best single modality + 2 points


def configure(parser: argparse.ArgumentParser) -> None:
    C.add_common_arguments(parser, scenario="av-digits.toml")
    parser.add_argument(
        "--epsilon", type=float, help="per-client budget of every run (default: the scenario's dp.epsilon; inf = non-private)"
    )


def source_folders(data: Path) -> tuple[Path, Path]:
    """FSDD and MNIST folders under the shared data root (``data/fsdd``, ``data/mnist``)."""
    from common.data.importers.av_digits import MNIST_IMAGES

    fsdd, mnist = data / "fsdd", data / "mnist"
    if not (fsdd / "recordings").is_dir() or not (mnist / MNIST_IMAGES).exists():
        raise ConfigError(
            f"--data {data}: expected the shared data root with fsdd/recordings/*.wav and mnist/{MNIST_IMAGES} (+ labels)"
        )
    return fsdd, mnist


def imported(data: Path, cache: Path) -> Path:
    """The six speaker sites of AV-Digits (pairing seed 0) in ``cache``, imported once."""
    from common.data.importers.av_digits import import_av_digits
    from common.data.site_folders import site_folders

    if cache.is_dir() and len(site_folders(cache)) == 6:
        return cache
    fsdd, mnist = source_folders(data)
    import_av_digits(fsdd, mnist, cache, seed=0, overwrite=True)
    return cache


def assignment(cache: Path, groups: str) -> dict[str, str]:
    """Which site holds which modalities: client i (sites sorted by name) gets group i mod len(groups)."""
    from common.data.site_folders import site_folders

    names = [p.name for p in site_folders(cache)]
    g = [x.strip() for x in groups.split(";") if x.strip()]
    return {name: g[i % len(g)] for i, name in enumerate(names)}


def cells(args: argparse.Namespace) -> list[C.Cell]:
    """Every simulation, seed by seed."""
    extra = {} if args.epsilon is None else {"dp.epsilon": args.epsilon}
    out = []
    for seed in range(args.seeds):
        out.append(C.Cell(f"mixed-s{seed}", seed, {"data.groups": MIXED_GROUPS} | extra))
        for name, group in BASELINES.items():
            out.append(C.Cell(f"{name}-s{seed}", seed, {"data.groups": group} | extra))
    return out


def summarize(runs: dict[str, dict[str, Any]], cells_: list[C.Cell]) -> dict[str, Any]:
    """Per-run accuracy by modality subset, then mean and std per setting."""
    per_run: dict[str, dict[str, Any]] = {}
    for cell in cells_:
        res = runs[cell.name]
        by = ((res.get("final") or {}).get("pooled") or {}).get("by_modalities", {})
        per_run[cell.name] = {
            "seed": cell.seed,
            "groups": res["config"]["data.groups"],
            "budget": res["config"]["dp.epsilon"],
            "max_epsilon": C.max_epsilon(res),
            "epsilon_ok": C.epsilon_ok(res),
            "seconds": res.get("bench_seconds"),
            "accuracy": {s: by[s]["accuracy"] for s in SUBSETS if s in by},
            "macro_f1": {s: by[s]["macro_f1"] for s in SUBSETS if s in by},
            "num_examples": {s: by[s]["num_examples"] for s in SUBSETS if s in by},
        }
    settings: dict[str, dict[str, Any]] = {}
    for name, row in per_run.items():
        s = settings.setdefault(name.rsplit("-s", 1)[0], {"groups": row["groups"], "runs": []})
        s["runs"].append(name)
    for s in settings.values():
        rows = [per_run[n] for n in s["runs"]]
        s["accuracy"] = {}
        for subset in SUBSETS:
            vals = [r["accuracy"][subset] for r in rows if subset in r["accuracy"]]
            if vals:
                m, sd = C.mean_std(vals)
                s["accuracy"][subset] = {"mean": m, "std": sd, "values": vals, "num_examples": rows[0]["num_examples"][subset]}
        s["max_epsilon"] = max(r["max_epsilon"] for r in rows)
        s["epsilon_ok"] = all(r["epsilon_ok"] for r in rows)
    return {"runs": per_run, "settings": settings}


def _acc(settings: dict[str, Any], key: str, subset: str) -> dict[str, Any] | None:
    return settings.get(key, {}).get("accuracy", {}).get(subset)


def targets(st: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with what was measured (None: not run)."""
    both = _acc(st, "mixed", "audio+image")
    singles = {s: _acc(st, "mixed", s) for s in ("image", "audio")}
    out = []
    if both and all(singles.values()):
        best_name, best = max(((s, v["mean"]) for s, v in singles.items() if v), key=lambda t: t[1])
        out.append(
            {
                "target": "both modalities >= best single modality + 2 points (mixed federation)",
                "measured": f"{100 * both['mean']:.1f} vs {best_name} {100 * best:.1f} ({100 * (both['mean'] - best):+.1f} points)",
                "met": both["mean"] >= best + FUSION_GAIN,
            }
        )
    else:
        out.append({"target": "both modalities >= best single modality + 2 points", "measured": "-", "met": None})
    for subset, baseline in (("image", "image-only"), ("audio", "audio-only")):
        mixed, base = singles[subset], _acc(st, baseline, subset)
        if mixed and base:
            out.append(
                {
                    "target": f"{subset} only >= {baseline} baseline (same budget and schedule)",
                    "measured": f"{100 * mixed['mean']:.1f} vs {100 * base['mean']:.1f} ({100 * (mixed['mean'] - base['mean']):+.1f} points)",
                    "met": mixed["mean"] >= base["mean"],
                }
            )
        else:
            out.append({"target": f"{subset} only >= {baseline} baseline", "measured": "-", "met": None})
    return out


def tables(summary: dict[str, Any], assigned: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown: accuracy by modalities at test time per federation, the assignment, the targets."""
    st = summary["settings"]
    rows = []
    for key, label in (
        ("mixed", "mixed (2 image, 2 audio, 2 both)"),
        ("image-only", "image-only baseline"),
        ("audio-only", "audio-only baseline"),
    ):
        if key not in st:
            continue
        cols = []
        for subset in SUBSETS:
            a = _acc(st, key, subset)
            cols.append("-" if a is None else f"{C.pm(a['values'])} (n = {a['num_examples']})")
        eps = st[key]["max_epsilon"]
        rows.append([label, *cols, "∞" if math.isinf(eps) else f"{eps:.2f}", str(len(st[key]["runs"]))])
    verdicts = targets(st)
    text = "\n\n".join(
        [
            "## Accuracy by modalities present at test time",
            C.markdown_table(["federation", "image only", "audio only", "audio + image", "max ε spent", "seeds"], rows),
            "## Sites of the mixed federation (sorted by name; client i gets group i)",
            C.markdown_table(["site", "modalities"], [[k, v] for k, v in assigned.items()]),
            "## Targets",
            C.markdown_table(
                ["target", "measured (mean over seeds)", "verdict"],
                [[v["target"], v["measured"], {True: "met", False: "not met", None: "not run"}[v["met"]]] for v in verdicts],
            ),
            "Accuracy in percent, mean ± sample std over seeds; n = test samples scored per run. In the mixed "
            "federation 'image only' is scored on the 4 speakers that hold images, 'audio only' on the 4 that hold "
            "audio, 'audio + image' on the 2 that hold both; the baselines score all 6 speakers.",
        ]
    )
    return text, verdicts


FEDERATION_LABELS = {"mixed": "mixed", "image-only": "image-only baseline", "audio-only": "audio-only baseline"}


def contributions(runs: dict[str, dict[str, Any]], settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each federation's modality contributions over its seeds, from the clients' held-out takes (``final``)."""
    return K.by_setting(runs, {key: s["runs"] for key, s in settings.items()}, "final")


def multimodal_clients(agg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The clients whose own attribution has two or more modalities, as rows for :func:`K.overall_table`."""
    return [
        (f"mixed, {client}", {"overall": games, "runs": games["accuracy"].get("runs", 0)})
        for client, games in (agg.get("clients") or {}).items()
        if len(games.get("accuracy", {}).get("modalities", [])) > 1
    ]


def contribution_tables(found: dict[str, dict[str, Any]], figure: str | None) -> str:
    """Markdown: contributions per federation, per client holding both modalities, per class (mixed), warnings."""
    if not found:
        return "## Modality contributions\n\nNo run has held-out figures by modality subset: nothing to attribute."
    rows = [(FEDERATION_LABELS.get(key, key), agg) for key, agg in found.items()]
    parts = [
        "## Modality contributions",
        "Shapley value of each modality and the interaction of the pair, in points of held-out accuracy over "
        "chance (1/10 = 10.0); the Shapley values add up to the score with both modalities minus chance. "
        "Positive interaction: the pair is worth more together than apart. Mean ± std over seeds. In the mixed "
        "federation the pooled figures score each subset on the speakers that hold it (image alone on 4, audio "
        "alone on 4, both on 2); the per-client rows score all three subsets on the same speaker's takes.",
        "### Accuracy (pooled over the clients' test takes)",
        K.overall_table(rows, "accuracy"),
        "### Macro-F1",
        K.overall_table(rows, "macro_f1"),
    ]
    mixed = found.get("mixed")
    if mixed and (clients := multimodal_clients(mixed)):
        parts += [
            "### Mixed federation, per client holding both modalities (accuracy on its own test takes)",
            K.overall_table(clients, "accuracy"),
        ]
    if figure:
        parts.append(f"![modality contributions]({figure})")
    if mixed and mixed.get("per_class"):
        parts += ["### Per class (digit), mixed federation, recall (pooled)", K.class_table(mixed, "accuracy")]
    parts += ["### Unimodal-collapse warnings", K.warnings_text(rows)]
    return "\n\n".join(parts)


def run(args: argparse.Namespace) -> int:
    def report(runs: dict[str, dict[str, Any]], todo: list[C.Cell], cache: Path, runs_dir: Path) -> tuple[str, dict[str, Any]]:
        summary = summarize(runs, todo)
        assigned = assignment(cache, MIXED_GROUPS)
        body, verdicts = tables(summary, assigned)
        found = contributions(runs, summary["settings"])
        mixed = found.get("mixed")
        figure = K.plot(
            [(FEDERATION_LABELS.get(k, k), v) for k, v in found.items()] + (multimodal_clients(mixed) if mixed else []),
            runs_dir.parent / "av-digits-contributions.png",
            per_class=("mixed", mixed) if mixed and mixed.get("per_class") else None,
            title="AV-Digits",
        )
        body += "\n\n" + contribution_tables(found, figure.name if figure else None)
        return body, {"mixed_assignment": assigned, "targets": verdicts, "contributions": found, **summary}

    return C.run_benchmark(
        args,
        name="av-digits",
        label="AV-Digits",
        title="AV-Digits: spoken + written digits, clients with different modalities",
        importer=imported,
        cells=lambda cache: cells(args),
        report=report,
    )
