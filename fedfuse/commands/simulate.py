"""``fedfuse simulate``: run a scenario in Flower's simulation engine and report the results."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from common.config import parse_run_config
from common.errors import ConfigError, FedfuseError
from common.logs import setup_logging
from fedfuse.progress import round_progress
from simulations.scenario import build_config

log = logging.getLogger("fedfuse.simulate")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", type=Path, help="scenario TOML file (run-config keys; see simulations/scenarios/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key, e.g. --set dp.epsilon=4 (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<date-time>)")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue an interrupted run from its last completed round, with its stored configuration",
    )
    parser.add_argument(
        "--cpus-per-client",
        type=float,
        default=1.0,
        help="CPU cores reserved per simulated client (default 1: one client per core)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="join this running Ray cluster (`ray start --head` prints it) instead of starting Ray "
        "here; the output folder must be on storage every node sees at the same path (default: "
        "$RAY_ADDRESS, else a Ray of this machine)",
    )


def run(args: argparse.Namespace) -> int:
    from common.data.partition import assigned_modalities, client_partition, dataset_schema, federation_space, num_clients
    from server.run_folder import RESULTS_FILE, RUN_FILE, RunFolder
    from simulations import runner

    if args.resume is not None:
        if args.scenario or args.overrides or args.out:
            raise ConfigError("--resume continues a run with its stored configuration: drop --scenario, --set and --out")
        out = args.resume.resolve()
        flat = RunFolder(out).stored_config()
        flat = parse_run_config(flat).to_flat()
    else:
        flat = build_config(args.scenario, args.overrides)
        out = (args.out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
        if (out / RUN_FILE).exists():
            raise ConfigError(f"{out} already holds a run; continue it with --resume {out}, or choose another --out")
    flat["out-dir"] = str(out)
    config = parse_run_config(flat)
    clients = num_clients(config)
    # Pre-flight: build every client's partition here, so that bad data or a bad scenario is reported
    # once, clearly, before Ray starts (inside a ClientApp it would only fail round after round). Synthetic
    # data cannot be bad: there, the start-up does not grow with the clients' data (0.5 s a client when loaded).
    federation_space(config)
    specs = {}
    if config.data.dataset == "synthetic":  # data fedfuse generates: build one client per group, assign all (cheap)
        for index in range(min(clients, len(config.data.group_list) or 1)):
            specs.update({m.name: m for m in client_partition(config, index).train.schema.modalities})
        schema = dataset_schema(config)
        held = {m for index in range(clients) for m in assigned_modalities(config, index, schema.names)[0]}
        specs.update({m.name: m for m in schema.restrict(sorted(held)).modalities})
    else:
        for index in range(clients):
            specs.update({m.name: m for m in client_partition(config, index).train.schema.modalities})
    # The run's encoders and warm-start files, checked once on synthetic inputs before any client starts.
    from common.model.validation import check_run_encoders

    check_run_encoders(
        tuple(specs.values()),
        config.model.encoders,
        config.model.inits,
        config.model.embed_dim,
        config.train.grad_sample_mode,
        norm=config.model.norm,
        width=config.model.width,
    )
    setup_logging(args.quiet, verbose=args.verbose)
    log.info("simulating %d clients for %d rounds; output in %s", clients, config.server.num_server_rounds, out)
    bar = sys.stderr.isatty() and not args.quiet and not args.verbose  # plain lines in a log file, a pipe or with -v
    try:
        with round_progress(config.server.num_server_rounds, enabled=bar):
            seconds = runner.run(
                flat,
                num_clients=clients,
                out_dir=out,
                cpus_per_client=args.cpus_per_client,
                verbose=args.verbose,
                ray_address=args.ray_address,
            )
    except KeyboardInterrupt:
        print(f"interrupted; continue with: fedfuse simulate --resume {out}", file=sys.stderr)
        return 130
    results_path = out / RESULTS_FILE
    if not results_path.exists():
        raise FedfuseError(f"the simulation wrote no {RESULTS_FILE}; see the log above")
    results = json.loads(results_path.read_text())
    from common.insight.plots import plot_results

    plot_results(results, out)
    print_summary(results, seconds)
    from fedfuse.commands.report import print_contributions, write_report

    print_contributions(results)
    try:
        print(f"report: {write_report(out)}")
    except Exception as exc:  # noqa: BLE001  (the run's results are written; a report failure must not hide them)
        print(f"could not write the run report ({type(exc).__name__}: {exc}); retry with: fedfuse report {out}", file=sys.stderr)
    if results.get("status") != "completed":
        print(f"the run did not complete; continue with: fedfuse simulate --resume {out}", file=sys.stderr)
        return 1
    return 0


def print_summary(results: dict[str, Any], seconds: float) -> None:
    """The final accuracy per modality subset and each client's privacy spend."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 120)
    final = results.get("final")
    if final:
        console.print(final_table(final, results["rounds"][-1]["round"]))
    console.print(privacy_table(results["privacy"]["clients"]))
    for warning in results.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] round {warning['round']}: {warning['message']}")
    console.print(
        f"{len(results['rounds'])} rounds in {seconds:.0f} s. Results, plots, checkpoints: {Path(results['config']['out-dir'])}"
    )


MAX_CLIENT_ROWS = 20  # more clients than this: one row per group of clients alike (every client is in results.json)


def privacy_table(clients: dict[str, dict[str, Any]]) -> Any:
    """Each client's privacy spend; past :data:`MAX_CLIENT_ROWS` clients, one row per (modalities, budget, status)."""
    from rich.table import Table

    from common.privacy.spend import format_spend

    def spend(c: dict[str, Any]) -> float:
        return math.inf if c.get("epsilon") is None else c["epsilon"]

    def budget(c: dict[str, Any]) -> str:
        return "∞" if c.get("budget") is None else f"{c['budget']:g}"

    if len(clients) <= MAX_CLIENT_ROWS:
        table = Table(title="Privacy spend per client")
        for column in ("client", "modalities", "rounds", "spend", "budget", "status"):
            table.add_column(column)
        for cid, c in sorted(clients.items()):
            table.add_row(
                cid,
                "+".join(c.get("modalities", [])),
                str(c.get("rounds_trained", 0)),
                format_spend(spend(c), c.get("delta")),
                budget(c),
                c.get("status", ""),
            )
        return table
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in clients.values():
        groups.setdefault(("+".join(c.get("modalities", [])), budget(c), c.get("status", "")), []).append(c)
    table = Table(
        title=f"Privacy spend of {len(clients)} clients, by modalities, budget and status",
        caption="every client's figures: results.json, privacy.clients",
    )
    for column in ("modalities", "budget", "status", "clients", "rounds", "highest spend"):
        table.add_column(column, justify="right" if column in ("clients", "rounds") else "left")
    for (modalities, budget_, status), members in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0])):
        rounds = sorted(c.get("rounds_trained", 0) for c in members)
        top = max(members, key=spend)
        table.add_row(
            modalities,
            budget_,
            status,
            str(len(members)),
            str(rounds[0]) if rounds[0] == rounds[-1] else f"{rounds[0]}-{rounds[-1]}",
            format_spend(spend(top), top.get("delta")),
        )
    return table


def final_table(final: dict[str, Any], last_round: int) -> Any:
    """Held-out scores of the last evaluated round: pooled over every client's test split, and the clients' mean.

    Rows: each sample with its own modalities, then the subsets worth showing (all of them are in results.json).
    """
    from rich.table import Table

    from common.model.evaluation import OWN_MODALITIES, shown_subsets

    pooled, mean = final.get("pooled"), final["client_mean"]
    head = pooled or mean
    title = f"Final held-out scores, round {last_round}" + ("" if pooled else " (mean of the clients' own scores)")
    table = Table(
        title=title,
        caption="pooled: every client's test examples together; client mean: each client's own "
        "macro-F1, weighted by its test examples"
        if pooled
        else None,
    )
    columns = ["modalities at test time", "accuracy", "macro-F1"] + (["macro-F1 (client mean)"] if pooled else []) + ["examples"]
    for column in columns:
        table.add_column(column, justify="left" if column.startswith("mod") else "right")

    def row(label: str, p: dict[str, Any], m: dict[str, Any] | None) -> None:
        extra = [f"{m['macro_f1']:.3f}" if m else "-"] if pooled else []
        table.add_row(label, f"{p['accuracy']:.3f}", f"{p['macro_f1']:.3f}", *extra, str(p["num_examples"]))

    row(OWN_MODALITIES, head, mean)
    subsets = shown_subsets(head["by_modalities"])
    for subset in subsets:
        row(subset, head["by_modalities"][subset], mean["by_modalities"].get(subset))
    hidden = len(head["by_modalities"]) - len(subsets)
    if hidden > 0:
        table.add_row(f"({hidden} more subsets in results.json)", "", "", *([""] if pooled else []), "")
    return table
