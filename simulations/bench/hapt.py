"""``fedfuse bench hapt``: HAPT activity recognition (6 classes, 21 training subjects as clients), macro-F1 by
privacy budget and by FedMultimodal's missing-modality rate p.

Cells, each run once per seed (``data.assignment = "dropout"``: each client drops each modality w.p. p):

- federated encoders, p = 0, every budget of ``--epsilons``: macro-F1 of the global model on the 9 test
  subjects (server-side, ``data.server-test``);
- federated encoders, every p of ``--drop-probs`` > 0, at the budget ``--dropout-epsilon``;
- local encoders, p = 0, every budget of ``--local-epsilons``: personalised macro-F1 on each client's held-out
  windows (results' ``final.client_mean.macro_f1``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from simulations.bench import _common as C

SOURCE_FILES = ("activity_labels.txt", "RawData/labels.txt", "Train/subject_id_train.txt")
TARGETS = {"non_private_f1": 0.88, "eps8_gap": 0.05, "dropout_gap": 0.03}


def configure(parser: argparse.ArgumentParser) -> None:
    C.add_common_arguments(parser, scenario="hapt.toml")
    parser.add_argument("--epsilons", default="inf,8,3,1",
                        help="budgets at p = 0 with federated encoders (default inf,8,3,1; inf = non-private)")
    parser.add_argument("--drop-probs", default="0,0.3,0.5",
                        help="missing-modality rates p (default 0,0.3,0.5); p > 0 runs at --dropout-epsilon")
    parser.add_argument("--dropout-epsilon", type=float, default=8.0,
                        help="the budget of the p > 0 runs (default 8: the best private setting)")
    parser.add_argument("--local-epsilons", default="inf,8",
                        help="budgets of the personalised runs with local encoders at p = 0 (default inf,8; '' = none)")


def source_folder(data: Path) -> Path:
    """The HAPT folder: ``data`` itself or ``data/hapt`` (the shared data root)."""
    for candidate in (data, data / "hapt"):
        if all((candidate / f).exists() for f in SOURCE_FILES):
            return candidate
    raise ConfigError(f"--data {data}: neither it nor {data / 'hapt'} holds the HAPT layout "
                      f"({', '.join(SOURCE_FILES)}, RawData/acc_expXX_userYY.txt, ...)")


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
            out.append(C.Cell(f"fed-p0-eps{C.eps_tag(eps)}-s{seed}", seed, fed | {"data.modality-drop-prob": 0.0, "dp.epsilon": eps}))
        for p in (p for p in probs if p > 0):
            name = f"fed-p{p:g}-eps{C.eps_tag(args.dropout_epsilon)}-s{seed}"
            out.append(C.Cell(name, seed, fed | {"data.modality-drop-prob": p, "dp.epsilon": args.dropout_epsilon}))
        for eps in local:
            out.append(C.Cell(f"local-p0-eps{C.eps_tag(eps)}-s{seed}", seed,
                              {"encoders": "local", "data.server-test": "", "data.modality-drop-prob": 0.0, "dp.epsilon": eps}))
    return out


def pooled_test_f1(run_dir: Path, cache: Path, config: dict[str, Any]) -> float:
    """Macro-F1 of the final global model over the pooled windows of all test subjects (FedMultimodal's measure)."""
    import torch

    from common.model.evaluation import macro_f1, predict
    from common.model.multimodal import ENCODER_PREFIX, ModelConfig, MultimodalModel
    from common.data.partition import heldout_sites
    from common.data.site_folders import federation_schema, load_site
    from server.run_folder import RunFolder

    state = RunFolder(run_dir).load_checkpoint().global_state
    sites = [load_site(p) for p in heldout_sites(cache)]
    schema = federation_schema(sites)
    trained = [m for m in schema.names if any(k.startswith(f"{ENCODER_PREFIX}{m}.") for k in state)]
    model = MultimodalModel(schema.restrict(trained),
                            ModelConfig(config["model.fusion"], config["model.embed-dim"], config["model.hidden-dim"]))
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
        row = {"seed": cell.seed, "encoders": res["config"]["encoders"], "p": res["config"]["data.modality-drop-prob"],
               "budget": cell.overrides["dp.epsilon"], "max_epsilon": C.max_epsilon(res), "epsilon_ok": C.epsilon_ok(res),
               "client_macro_f1": final.get("macro_f1"), "client_accuracy": final.get("accuracy"),
               "seconds": res.get("bench_seconds")}
        if server:
            row |= {"test_macro_f1_per_subject": server["macro_f1"], "test_accuracy": server["accuracy"],
                    "test_by_modalities": {k: v["macro_f1"] for k, v in server["by_modalities"].items()},
                    "test_macro_f1": pooled_test_f1(runs_dir / cell.name, cache, res["config"])}
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
        rows.append([C.fmt_eps(eps), C.pm(_vals(st, fed, "test_macro_f1")), C.pm(_vals(st, fed, "test_macro_f1_per_subject")),
                     C.pm(_vals(st, fed, "test_accuracy")), C.pm(_vals(st, loc, "client_macro_f1")),
                     "∞" if not spent or math.isinf(max(spent)) else f"{max(spent):.2f}", str(len(_vals(st, fed, "test_macro_f1")))])
    privacy = C.markdown_table(
        ["budget ε (δ = 1e-5)", "test subjects macro-F1 (pooled)", "test macro-F1 (mean over subjects)",
         "test accuracy", "personalised macro-F1 (local encoders)", "max ε spent", "seeds"], rows)
    deps, dtag = C.fmt_eps(args.dropout_epsilon), C.eps_tag(args.dropout_epsilon)
    rows = []
    for p in [float(x) for x in args.drop_probs.split(",") if x.strip()]:
        key = f"fed-p0-eps{dtag}" if p == 0 else f"fed-p{p:g}-eps{dtag}"
        runs = [summary["runs"][n] for n in st.get(key, {}).get("runs", [])]
        by = {m: [r["test_by_modalities"].get(m) for r in runs if r.get("test_by_modalities")] for m in ("acc", "gyro")}
        rows.append([f"{p:g}", C.pm(_vals(st, key, "test_macro_f1")), C.pm(_vals(st, key, "test_accuracy")),
                     C.pm([v for v in by["acc"] if v is not None]), C.pm([v for v in by["gyro"] if v is not None]),
                     C.pm(_vals(st, key, "client_macro_f1")), str(len(_vals(st, key, "test_macro_f1")))])
    dropout = C.markdown_table(
        [f"p (ε = {deps})", "test macro-F1 (pooled)", "test accuracy", "test macro-F1, acc only", "test macro-F1, gyro only",
         "clients' held-out macro-F1 (global model)", "seeds"], rows)
    verdicts = targets(st, args)
    target_rows = [[v["target"], v["measured"], {True: "met", False: "not met", None: "not run"}[v["met"]]] for v in verdicts]
    text = "\n\n".join([
        "## Macro-F1 by privacy budget (p = 0, complete modalities)", privacy,
        f"## Macro-F1 by missing-modality rate p (federated encoders, ε = {deps})", dropout,
        "## Targets", C.markdown_table(["target", "measured (mean over seeds)", "verdict"], target_rows),
        "Figures are mean ± sample std over seeds, in percent. Test subjects: the 9 subjects of the publisher's "
        "split, scored by the server on the final global model (federated encoders). Personalised: each client's "
        "own encoders + the global head on its held-out windows (every 5th window; they overlap their "
        "neighbours, so the figure is optimistic).",
    ])
    return text, verdicts


def targets(st: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each target of the issue with what was measured and whether it is met (None: the needed cells were not run)."""
    mean = lambda key: C.mean_std(_vals(st, key, "test_macro_f1"))[0] if _vals(st, key, "test_macro_f1") else None  # noqa: E731
    nonpriv, eps8 = mean("fed-p0-epsinf"), mean("fed-p0-eps8")
    deps, dtag = C.fmt_eps(args.dropout_epsilon), C.eps_tag(args.dropout_epsilon)
    p0, p5 = mean(f"fed-p0-eps{dtag}"), mean(f"fed-p0.5-eps{dtag}")
    out = [
        {"target": "non-private macro-F1 >= 88 at p = 0", "measured": _pct(nonpriv),
         "met": None if nonpriv is None else nonpriv >= TARGETS["non_private_f1"]},
        {"target": "ε = 8 within 5 points of non-private", "measured": _gap(eps8, nonpriv),
         "met": None if eps8 is None or nonpriv is None else nonpriv - eps8 <= TARGETS["eps8_gap"]},
        {"target": f"p = 0.5 at most 3 points below p = 0 (ε = {deps})", "measured": _gap(p5, p0),
         "met": None if p5 is None or p0 is None else p0 - p5 <= TARGETS["dropout_gap"]},
    ]
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _gap(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{100 * a:.1f} vs {100 * b:.1f} ({100 * (a - b):+.1f} points)"


def run(args: argparse.Namespace) -> int:
    def report(runs: dict[str, dict[str, Any]], todo: list[C.Cell], cache: Path, runs_dir: Path) -> tuple[str, dict[str, Any]]:
        summary = summarize(runs, todo, cache, runs_dir)
        body, verdicts = tables(summary, args)
        return body, {"targets": verdicts, **summary}

    return C.run_benchmark(args, name="hapt", label="HAPT", title="HAPT: federated multimodal activity recognition",
                           importer=imported, cells=lambda cache: cells(args, cache), report=report)
