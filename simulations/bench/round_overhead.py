"""``fedfuse bench round-overhead``: how much a simulated round costs beyond the clients' own training.

For each round of a real simulation (Flower + Ray, the fedfuse apps, DP on): the wall time of the
round's training phase (the server sends the head, every client trains and replies, the server
aggregates) divided by the summed time the clients spent in ``train_round`` (read from each
client's site-local training log). With one client at a time (``--cpus-per-client 2`` on a
2-core machine) the ratio is 1 + overhead / compute. Round 1 also pays for starting the Ray
actors and is reported separately; the median over the later rounds is printed last.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--samples-per-client", type=int, default=1200)
    parser.add_argument(
        "--cpus-per-client",
        type=float,
        default=2.0,
        help="cores reserved per client (default 2: one client at a time on 2 cores)",
    )
    parser.add_argument("--out", type=Path, help="keep the run here (default: a temporary folder)")


def run(args: argparse.Namespace) -> int:
    import json

    from client.state import ClientState
    from common.logs import setup_logging
    from simulations import runner
    from simulations.scenario import build_config

    setup_logging(quiet=True)  # the table below is the output: Flower's and fedfuse's progress lines only at WARNING
    with tempfile.TemporaryDirectory(prefix="fedfuse-bench-") as tmp:
        out = (args.out or Path(tmp) / "run").resolve()
        flat = build_config(
            None,
            [
                f"num-server-rounds={args.rounds}",
                f"data.num-clients={args.clients}",
                f"data.samples-per-client={args.samples_per_client}",
                "data.assignment=all",
                f"out-dir={json.dumps(str(out))}",
            ],
        )
        wall = runner.run(flat, num_clients=args.clients, out_dir=out, cpus_per_client=args.cpus_per_client)
        results = json.loads((out / "results.json").read_text())
        compute: dict[int, float] = {}
        for client in (out / "clients").iterdir():
            for line in ClientState(client).training_log():
                compute[line["round"]] = compute.get(line["round"], 0.0) + line["seconds"]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(
        f"command: fedfuse bench round-overhead --clients {args.clients} --rounds {args.rounds} "
        f"--samples-per-client {args.samples_per_client} --cpus-per-client {args.cpus_per_client:g}"
    )
    print(f"whole simulation: {wall:.1f} s (Ray start-up and imports included)")
    print(f"{'round':>5} {'train wall s':>13} {'client compute s':>17} {'ratio':>7} {'round wall s':>13}")
    ratios = []
    for r in results["rounds"]:
        n = r["round"]
        ratio = r["train_seconds"] / compute[n]
        if n > 1:
            ratios.append(ratio)
        print(f"{n:>5} {r['train_seconds']:>13.2f} {compute[n]:>17.2f} {ratio:>7.3f} {r['seconds']:>13.2f}")
    print("(round wall = training phase + federated evaluation + checkpoint; round 1 includes actor start-up)")
    print(f"round-overhead ratio (median of rounds 2-{args.rounds}): {statistics.median(ratios):.3f}")
    return 0
