"""``fedfuse bench deploy-round``: per-round wall time of a real deployment on loopback, Flower's defaults vs each improvement.

Each variant starts its own deployment (``simulations/deployment.py``: a SuperLink with TLS and
SuperNode authentication, three sites holding image+signal, signal and tabular+image) and runs the
default model for ``--rounds`` rounds. A round's time is what the ServerApp records in results.json
(the train phase, the evaluate phase when there is one, aggregation and the checkpoint). The
variants add one improvement at a time:

- ``flower``: ``flower-supernode`` as is (a fresh ``flwr-clientapp`` process per message) and the
  ServerApp pulling replies every 3 s, as Flower's ``send_and_receive`` does;
- ``poll``: + replies pulled every 0.2 s (``server/grid.py``);
- ``warm``: + the warm executor (``client/executor.py``), Flower's SuperNode waits (3 s after an
  empty pull, 0.5 s between reply checks);
- ``waits``: + those waits shortened to 0.2 s / 0.05 s (``client/supernode.py``);
- ``quick``: + objects of a message that are not there yet retried after 0.05 s instead of Flower's 1 s,
  2 s, 4 s ... at every hop (``common/flower_pulls.py``): ``fedfuse site supernode`` as it runs by default;
- ``eval-last``: + ``evaluate-every`` = rounds (clients evaluate in the last round only).

The variants before ``quick`` run with ``FEDFUSE_FLOWER_PULL_RETRIES=1`` (Flower's own retries).

Needs a source checkout (the app is built from it). The machine's load average is printed beside
each variant: on a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common.flower_pulls import KEEP_FLOWER_RETRIES

FLOWER_WAITS = ("--pull-wait", "3", "--reply-wait", "0.5")  # `fedfuse site supernode` with Flower's own waits

# name -> (site isolation, ServerApp reply poll interval in s, evaluate every round?, `fedfuse site supernode` options,
#          quick object retries?)
VARIANTS: dict[str, tuple[str, float, bool, tuple[str, ...], bool]] = {
    "flower": ("subprocess", 3.0, True, (), False),
    "poll": ("subprocess", 0.2, True, (), False),
    "warm": ("warm", 0.2, True, FLOWER_WAITS, False),
    "waits": ("warm", 0.2, True, (), False),
    "quick": ("warm", 0.2, True, (), True),
    "eval-last": ("warm", 0.2, False, (), True),
}
DESCRIPTIONS = {
    "flower": "Flower defaults (flwr-clientapp per message, 3 s reply polling)",
    "poll": "+ ServerApp polls replies every 0.2 s",
    "warm": "+ warm executor, Flower's SuperNode waits",
    "waits": "+ SuperNode waits 0.2 s / 0.05 s",
    "quick": "+ objects not there yet retried after 0.05 s (fedfuse site supernode as it runs by default)",
    "eval-last": "+ evaluate-every = rounds (clients evaluate in the last round only)",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (default: 4)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the deployments' folders (logs, runs) here")


def _load() -> float:
    return os.getloadavg()[0]


def measure(name: str, folder: Path, rounds: int) -> dict:
    """Run one variant in a fresh deployment; return its per-round seconds and load averages."""
    from simulations import deployment as helpers

    isolation, poll, evaluate_each_round, site_options, quick = VARIANTS[name]
    config = {
        "num-server-rounds": rounds,
        "evaluate-every": 1 if evaluate_each_round else rounds,
        "dp.epsilon": 8.0,
        "round-timeout": 300.0,
    }
    load_before = _load()
    # every process of the deployment inherits this environment (the SuperLink's ServerApp and the sites)
    previous = os.environ.pop(KEEP_FLOWER_RETRIES, None)
    if not quick:
        os.environ[KEEP_FLOWER_RETRIES] = "1"
    try:
        with helpers.deployment(
            folder, isolation=isolation, superlink_env={"FEDFUSE_REPLY_POLL_INTERVAL": str(poll)}, site_options=site_options
        ) as dep:
            load_ready = _load()
            run = dep.run(config, timeout=120 + 120 * rounds)
    finally:
        os.environ.pop(KEEP_FLOWER_RETRIES, None)
        if previous is not None:
            os.environ[KEEP_FLOWER_RETRIES] = previous
    seconds = [r["seconds"] for r in run.results["rounds"]]
    return {
        "variant": name,
        "description": DESCRIPTIONS[name],
        "round_seconds": seconds,
        "median": statistics.median(seconds[1:] if len(seconds) > 1 else seconds),
        "mean": statistics.fmean(seconds),
        "run_seconds": round(run.seconds, 1),
        "load": [round(load_before, 2), round(load_ready, 2), round(_load(), 2)],
    }


def run(args: argparse.Namespace) -> int:
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or args.rounds < 2:
        from common.errors import ConfigError

        raise ConfigError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}" if unknown else "--rounds must be >= 2")
    from simulations.deployment import check_checkout

    check_checkout()
    figures = []
    with tempfile.TemporaryDirectory(prefix="ffdep-", dir="/tmp") as tmp:
        base = args.keep.resolve() if args.keep else Path(tmp)
        for name in names:
            started = time.monotonic()
            figures.append(measure(name, base / name, args.rounds))
            f = figures[-1]
            print(
                f"{name}: rounds {f['round_seconds']} s, median {f['median']:.1f} s, load {f['load']} "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )

    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"command: fedfuse bench deploy-round --rounds {args.rounds} --variants {','.join(names)}")
    print("3 sites (image+signal, signal, tabular+image), default model, TLS + SuperNode auth, loopback")
    print(f"{'variant':<10} {'median s/round':>15} {'mean':>6} {'run s':>6}  {'load (start, ready, end)':<25} rounds")
    for f in figures:
        print(
            f"{f['variant']:<10} {f['median']:>15.1f} {f['mean']:>6.1f} {f['run_seconds']:>6.1f}  "
            f"{str(f['load']):<25} {f['round_seconds']}"
        )
    print(
        "median over rounds 2..N (round 1 also calibrates each site's noise); "
        + "; ".join(f"{f['variant']} = {f['description']}" for f in figures)
    )
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "variants": figures}, indent=2) + "\n")
    return 0
