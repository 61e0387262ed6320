"""``fedfuse bench hapt``: HAPT activity recognition (6 classes, 21 training subjects as clients), macro-F1 by
privacy budget and by FedMultimodal's missing-modality rate p.

Cells, each run once per seed (``data.assignment = "dropout"``: each client drops each modality w.p. p):

- federated encoders, p = 0, every budget of ``--epsilons``: macro-F1 of the global model on the 9 test
  subjects (server-side, ``data.server-test``);
- federated encoders, every p of ``--drop-probs`` > 0, at the budget ``--dropout-epsilon``;
- local encoders, p = 0, every budget of ``--local-epsilons``: personalised macro-F1 on each client's held-out
  windows (results' ``final.client_mean.macro_f1``).

Each setting's modality contributions (what acc and gyro add, their interaction, per class) are aggregated over
its seeds from the runs' results.json: on the test subjects for federated encoders, on the clients' held-out
windows for local ones (``_contributions.py``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from simulations.bench import _common as C
from simulations.bench import _contributions as K

if TYPE_CHECKING:
    from common.config import ModelConfig

SOURCE_FILES = ("activity_labels.txt", "RawData/labels.txt", "Train/subject_id_train.txt")
# test-subject macro-F1 (pooled) by budget, and the ε = 3 seed spread (issue 11); the gaps of the first benchmark
TARGETS = {"inf": 0.90, "8": 0.88, "3": 0.85, "1": 0.70, "eps3_spread": 0.02, "eps8_gap": 0.05, "dropout_gap": 0.03}


def configure(parser: argparse.ArgumentParser) -> None:
    C.add_common_arguments(parser, scenario="hapt.toml")
    parser.add_argument(
        "--epsilons", default="inf,8,3,1", help="budgets at p = 0 with federated encoders (default inf,8,3,1; inf = non-private)"
    )
    parser.add_argument(
        "--drop-probs", default="0,0.3,0.5", help="missing-modality rates p (default 0,0.3,0.5); p > 0 runs at --dropout-epsilon"
    )
    parser.add_argument(
        "--dropout-epsilon", type=float, default=8.0, help="the budget of the p > 0 runs (default 8: the best private setting)"
    )
    parser.add_argument(
        "--local-epsilons",
        default="inf,8",
        help="budgets of the personalised runs with local encoders at p = 0 (default inf,8; '' = none)",
    )


def source_folder(data: Path) -> Path:
    """The HAPT folder: ``data`` itself or ``data/hapt`` (the shared data root)."""
    for candidate in (data, data / "hapt"):
        if all((candidate / f).exists() for f in SOURCE_FILES):
            return candidate
    raise ConfigError(
        f"--data {data}: neither it nor {data / 'hapt'} holds the HAPT layout "
        f"({', '.join(SOURCE_FILES)}, RawData/acc_expXX_userYY.txt, ...)"
    )


def imported(data: Path, cache: Path) -> Path:
    """The site folders of HAPT (6 classes, 20 % of each training subject held out) in ``cache``, imported once."""
    from common.data.importers.hapt import import_hapt
    from common.data.site_folders import site_folders

    if cache.is_dir() and len(site_folders(cache)) == 30:
        return cache
    import_hapt(source_folder(data), cache, classes=6, holdout=0.2, overwrite=True)
    return cache


def cells(args: argparse.Namespace, cache: Path) -> list[C.Cell]:
    """Every simulation of the benchmark, seed by seed (so that a partial run already has whole seeds)."""
    epsilons = C.epsilon_list(args.epsilons)
    local = C.epsilon_list(args.local_epsilons) if args.local_epsilons.strip() else []
    probs = [float(p) for p in args.drop_probs.split(",") if p.strip()]
    out = []
    for seed in range(args.seeds):
        fed = {"encoders": "federated", "data.server-test": str(cache)}
        for eps in epsilons:
            out.append(
                C.Cell(f"fed-p0-eps{C.eps_tag(eps)}-s{seed}", seed, fed | {"data.modality-drop-prob": 0.0, "dp.epsilon": eps})
            )
        for p in (p for p in probs if p > 0):
            name = f"fed-p{p:g}-eps{C.eps_tag(args.dropout_epsilon)}-s{seed}"
            out.append(C.Cell(name, seed, fed | {"data.modality-drop-prob": p, "dp.epsilon": args.dropout_epsilon}))
        for eps in local:
            out.append(
                C.Cell(
                    f"local-p0-eps{C.eps_tag(eps)}-s{seed}",
                    seed,
                    {"encoders": "local", "data.server-test": "", "data.modality-drop-prob": 0.0, "dp.epsilon": eps},
                )
            )
    return out


def saved_model_config(saved: dict[str, Any]) -> ModelConfig:
    """The model configuration of a finished run from the flat config its results.json holds.

    Only the ``model.*`` keys are parsed: results.json writes a non-private run's ``dp.epsilon = inf`` as null (JSON
    has no infinity), which the run config's parser rightly refuses.
    """
    from common.config import parse_run_config

    return parse_run_config({k: v for k, v in saved.items() if k.startswith("model.")}).model


def pooled_test_f1(run_dir: Path, cache: Path, config: dict[str, Any]) -> float:
    """Macro-F1 of the final global model over the pooled windows of all test subjects (FedMultimodal's measure)."""
    import torch

    from common.data.partition import heldout_sites
    from common.data.site_folders import federation_schema, load_site
    from common.model.evaluation import macro_f1, predict
    from common.model.multimodal import ENCODER_PREFIX, MultimodalModel
    from server.run_folder import RunFolder

    state = RunFolder(run_dir).load_checkpoint().served_state  # the EMA when the run keeps one (ema-decay)
    sites = [load_site(p) for p in heldout_sites(cache)]
    schema = federation_schema(sites)
    trained = [m for m in schema.names if any(k.startswith(f"{ENCODER_PREFIX}{m}.") for k in state)]
    model = MultimodalModel(schema.restrict(trained), saved_model_config(config))
    model.load_partial({k: v for k, v in state.items() if k in model.state_dict()})
    truth, pred = [], []
    for site in sites:
        part = site.part("test").restrict(trained)
        truth.append(part.labels)
        pred.append(predict(model, part))
    return macro_f1(torch.cat(truth), torch.cat(pred), schema.num_classes)


def summarize(runs: dict[str, dict[str, Any]], cells_: list[C.Cell], cache: Path, runs_dir: Path) -> dict[str, Any]:
    """Per-run figures, then mean and std per setting (the cell name without its seed)."""
    per_run: dict[str, dict[str, Any]] = {}
    for cell in cells_:
        res = runs[cell.name]
        final = (res.get("final") or {}).get("client_mean") or {}  # each client's own held-out windows, mean
        server = (res.get("final_server_evaluate") or {}).get("client_mean") or {}  # per test subject, mean
        row = {
            "seed": cell.seed,
            "encoders": res["config"]["encoders"],
            "p": res["config"]["data.modality-drop-prob"],
            "budget": cell.overrides["dp.epsilon"],
            "max_epsilon": C.max_epsilon(res),
            "epsilon_ok": C.epsilon_ok(res),
            "client_macro_f1": final.get("macro_f1"),
            "client_accuracy": final.get("accuracy"),
            "seconds": res.get("bench_seconds"),
        }
        if server:
            row |= {
                "test_macro_f1_per_subject": server["macro_f1"],
                "test_accuracy": server["accuracy"],
                "test_by_modalities": {k: v["macro_f1"] for k, v in server["by_modalities"].items()},
                "test_macro_f1": pooled_test_f1(runs_dir / cell.name, cache, res["config"]),
            }
        per_run[cell.name] = row
    settings: dict[str, dict[str, Any]] = {}
    for name, row in per_run.items():
        key = name.rsplit("-s", 1)[0]
        s = settings.setdefault(key, {"encoders": row["encoders"], "p": row["p"], "budget": row["budget"], "runs": []})
        s["runs"].append(name)
    for s in settings.values():
        rows = [per_run[n] for n in s["runs"]]
        for metric in ("test_macro_f1", "test_macro_f1_per_subject", "test_accuracy", "client_macro_f1", "max_epsilon"):
            vals = [r[metric] for r in rows if r.get(metric) is not None]
            if vals:
                mean, std = C.mean_std(vals)
                s[metric] = {"mean": mean, "std": std, "values": vals}
        s["epsilon_ok"] = all(r["epsilon_ok"] for r in rows)
    return {"runs": per_run, "settings": settings}


def _vals(settings: dict[str, Any], key: str, metric: str) -> list[float]:
    return settings.get(key, {}).get(metric, {}).get("values", [])


def tables(summary: dict[str, Any], args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    """The markdown tables (privacy, missing modalities, targets) and the target verdicts."""
    st = summary["settings"]
    rows = []
    for eps in C.epsilon_list(args.epsilons):
        fed, loc = f"fed-p0-eps{C.eps_tag(eps)}", f"local-p0-eps{C.eps_tag(eps)}"
        spent = _vals(st, fed, "max_epsilon") or _vals(st, loc, "max_epsilon")
        rows.append(
            [
                C.fmt_eps(eps),
                C.pm(_vals(st, fed, "test_macro_f1")),
                C.pm(_vals(st, fed, "test_macro_f1_per_subject")),
                C.pm(_vals(st, fed, "test_accuracy")),
                C.pm(_vals(st, loc, "client_macro_f1")),
                "∞" if not spent or math.isinf(max(spent)) else f"{max(spent):.2f}",
                str(len(_vals(st, fed, "test_macro_f1"))),
            ]
        )
    privacy = C.markdown_table(
        [
            "budget ε (δ = 1e-5)",
            "test subjects macro-F1 (pooled)",
            "test macro-F1 (mean over subjects)",
            "test accuracy",
            "personalised macro-F1 (local encoders)",
            "max ε spent",
            "seeds",
        ],
        rows,
    )
    deps, dtag = C.fmt_eps(args.dropout_epsilon), C.eps_tag(args.dropout_epsilon)
    rows = []
    for p in [float(x) for x in args.drop_probs.split(",") if x.strip()]:
        key = f"fed-p0-eps{dtag}" if p == 0 else f"fed-p{p:g}-eps{dtag}"
        runs = [summary["runs"][n] for n in st.get(key, {}).get("runs", [])]
        by = {m: [r["test_by_modalities"].get(m) for r in runs if r.get("test_by_modalities")] for m in ("acc", "gyro")}
        rows.append(
            [
                f"{p:g}",
                C.pm(_vals(st, key, "test_macro_f1")),
                C.pm(_vals(st, key, "test_accuracy")),
                C.pm([v for v in by["acc"] if v is not None]),
                C.pm([v for v in by["gyro"] if v is not None]),
                C.pm(_vals(st, key, "client_macro_f1")),
                str(len(_vals(st, key, "test_macro_f1"))),
            ]
        )
    dropout = C.markdown_table(
        [
            f"p (ε = {deps})",
            "test macro-F1 (pooled)",
            "test accuracy",
            "test macro-F1, acc only",
            "test macro-F1, gyro only",
            "clients' held-out macro-F1 (global model)",
            "seeds",
        ],
        rows,
    )
    verdicts = targets(st, args)
    target_rows = [[v["target"], v["measured"], {True: "met", False: "not met", None: "not run"}[v["met"]]] for v in verdicts]
    text = "\n\n".join(
        [
            "## Macro-F1 by privacy budget (p = 0, complete modalities)",
            privacy,
            f"## Macro-F1 by missing-modality rate p (federated encoders, ε = {deps})",
            dropout,
            "## Targets",
            C.markdown_table(["target", "measured (mean over seeds)", "verdict"], target_rows),
            "Figures are mean ± sample std over seeds, in percent. Test subjects: the 9 subjects of the publisher's "
            "split, scored by the server on the final global model (federated encoders). Personalised: each client's "
            "own encoders + the global head on its held-out windows (every 5th window; they overlap their "
            "neighbours, so the figure is optimistic).",
        ]
    )
    return text, verdicts


def targets(st: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each target of the issue with what was measured and whether it is met (None: the needed cells were not run)."""
    vals = lambda key: _vals(st, key, "test_macro_f1")  # noqa: E731
    mean = lambda key: C.mean_std(vals(key))[0] if vals(key) else None  # noqa: E731
    nonpriv, eps8 = mean("fed-p0-epsinf"), mean("fed-p0-eps8")
    deps, dtag = C.fmt_eps(args.dropout_epsilon), C.eps_tag(args.dropout_epsilon)
    p0, p5 = mean(f"fed-p0-eps{dtag}"), mean(f"fed-p0.5-eps{dtag}")
    out = []
    for tag, label in (("inf", "non-private"), ("8", "ε = 8"), ("3", "ε = 3"), ("1", "ε = 1")):
        m = mean(f"fed-p0-eps{tag}")
        out.append(
            {
                "target": f"{label}: test-subject macro-F1 >= {100 * TARGETS[tag]:.0f} at p = 0",
                "measured": _pct(m),
                "met": None if m is None else m >= TARGETS[tag],
            }
        )
    spread = C.mean_std(vals("fed-p0-eps3"))[1] if len(vals("fed-p0-eps3")) > 1 else None
    out += [
        {
            "target": "ε = 3: seed spread (sample std) under 2 points",
            "measured": "-" if spread is None else f"{100 * spread:.1f} points",
            "met": None if spread is None else spread < TARGETS["eps3_spread"],
        },
        {
            "target": "ε = 8 within 5 points of non-private",
            "measured": _gap(eps8, nonpriv),
            "met": None if eps8 is None or nonpriv is None else nonpriv - eps8 <= TARGETS["eps8_gap"],
        },
        {
            "target": f"p = 0.5 at most 3 points below p = 0 (ε = {deps})",
            "measured": _gap(p5, p0),
            "met": None if p5 is None or p0 is None else p0 - p5 <= TARGETS["dropout_gap"],
        },
    ]
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _gap(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{100 * a:.1f} vs {100 * b:.1f} ({100 * (a - b):+.1f} points)"


def setting_label(setting: dict[str, Any]) -> str:
    """``federated, p = 0.3, ε = 8``."""
    return f"{setting['encoders']}, p = {setting['p']:g}, ε = {C.fmt_eps(float(setting['budget']))}"


def contributions(runs: dict[str, dict[str, Any]], settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each setting's modality contributions over its seeds: on the test subjects (the server's evaluation) when
    its runs have one (federated encoders), else on the clients' own held-out windows (local encoders)."""
    source = {
        key: "final_server_evaluate" if all(runs[n].get("final_server_evaluate") for n in s["runs"]) else "final"
        for key, s in settings.items()
    }
    return K.by_setting(runs, {key: s["runs"] for key, s in settings.items()}, source)


def contribution_tables(
    found: dict[str, dict[str, Any]], settings: dict[str, dict[str, Any]], args: argparse.Namespace, figure: str | None
) -> str:
    """Markdown: contributions per setting (accuracy, macro-F1), per class for the p = 0 federated settings, warnings."""
    if not found:
        return "## Modality contributions\n\nNo run has held-out figures by modality subset: nothing to attribute."
    where = {"final_server_evaluate": "test subjects", "final": "clients' held-out windows"}
    rows = [(f"{setting_label(settings[key])} ({where[agg['source']]})", agg) for key, agg in found.items()]
    parts = [
        "## Modality contributions",
        "Shapley value of each modality and the interaction of the pair, in points of the held-out score over "
        f"chance (1/6 = {100 / 6:.1f}); the Shapley values add up to the score with both modalities minus chance. "
        "Positive interaction: the pair is worth more together than apart. Mean ± std over seeds.",
        "### Accuracy",
        K.overall_table(rows, "accuracy"),
        "### Macro-F1",
        K.overall_table(rows, "macro_f1"),
    ]
    if figure:
        parts.append(f"![modality contributions]({figure})")
    for key in dict.fromkeys(["fed-p0-epsinf", f"fed-p0-eps{C.eps_tag(args.dropout_epsilon)}"]):
        if key in found and found[key].get("per_class"):
            parts += [
                f"### Per class: {setting_label(settings[key])} ({where[found[key]['source']]}), recall",
                K.class_table(found[key], "accuracy"),
            ]
    parts += ["### Unimodal-collapse warnings", K.warnings_text(rows)]
    return "\n\n".join(parts)


def per_class_setting(found: dict[str, Any], args: argparse.Namespace) -> str | None:
    """The setting whose per-class values the plot shows: the p = 0 federated run at the dropout budget, else any."""
    key = f"fed-p0-eps{C.eps_tag(args.dropout_epsilon)}"
    return key if key in found else next((k for k, v in found.items() if v.get("per_class")), None)


def run(args: argparse.Namespace) -> int:
    def report(runs: dict[str, dict[str, Any]], todo: list[C.Cell], cache: Path, runs_dir: Path) -> tuple[str, dict[str, Any]]:
        summary = summarize(runs, todo, cache, runs_dir)
        body, verdicts = tables(summary, args)
        found = contributions(runs, summary["settings"])
        st = summary["settings"]
        key = per_class_setting(found, args)
        figure = K.plot(
            [(setting_label(st[k]), v) for k, v in found.items()],
            runs_dir.parent / "hapt-contributions.png",
            per_class=(setting_label(st[key]), found[key]) if key else None,
            title="HAPT",
        )
        body += "\n\n" + contribution_tables(found, st, args, figure.name if figure else None)
        return body, {"targets": verdicts, "contributions": found, **summary}

    return C.run_benchmark(
        args,
        name="hapt",
        label="HAPT",
        title="HAPT: federated multimodal activity recognition",
        importer=imported,
        cells=lambda cache: cells(args, cache),
        report=report,
    )
