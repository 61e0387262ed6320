"""``fedfuse bench scale``: per-round time and peak memory of a simulation as the number of clients grows.

For each client count, one real ``fedfuse simulate`` (its own process, Flower + Ray) on synthetic
data with ``encoders = "federated"``, a fixed fraction of the clients training and evaluating each
round. Printed side by side: each round's wall time and the clients trained in it (results.json
``rounds[i].seconds``), and the peak resident memory of the whole process tree (the simulate process,
Ray's services and its workers, sampled from ``/proc`` every 0.2 s). Client state lives on disk
(``<out>/clients/<id>/``), so memory should follow the clients trained in a round, not the clients
that exist.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", default="100,1000", help="comma-separated client counts (default: 100,1000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--fraction", type=float, default=0.05, help="fraction of clients training (and evaluating) each round (default: 0.05)"
    )
    parser.add_argument("--samples-per-client", type=int, default=200)
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (Linux /proc)."""
    tree, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class PeakMemory:
    """Samples a process tree's resident memory in a thread until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def simulate(clients: int, args: argparse.Namespace, out: Path) -> dict:
    """One simulation in its own process; its per-round figures and the process tree's peak memory."""
    sets = [
        f"data.num-clients={clients}",
        f"num-server-rounds={args.rounds}",
        f"fraction-train={args.fraction}",
        f"fraction-evaluate={args.fraction}",
        'encoders="federated"',
        "min-clients=1",
        f"data.samples-per-client={args.samples_per_client}",
    ]
    command = [str(Path(sys.executable).parent / "fedfuse"), "simulate", "--quiet", "--out", str(out)]
    for s in sets:
        command += ["--set", s]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(proc.pid)
    output, _ = proc.communicate()
    peak = memory.stop()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the simulation of {clients} clients failed (exit {proc.returncode}):\n{output[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    rounds = [
        {"round": r["round"], "seconds": r["seconds"], "trained": len(r["train"].get("trained", []))} for r in results["rounds"]
    ]
    return {
        "clients": clients,
        "rounds": rounds,
        "peak_bytes": peak,
        "wall_seconds": round(wall, 1),
        "results_bytes": (out / "results.json").stat().st_size,
        "state_folders": sum(1 for _ in (out / "clients").iterdir()) if (out / "clients").exists() else 0,
        "sets": sets,
    }


def run(args: argparse.Namespace) -> int:
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    figures = []
    with tempfile.TemporaryDirectory(prefix="fedfuse-scale-") as tmp:
        base = args.out.resolve() if args.out else Path(tmp)
        for n in counts:
            print(f"simulating {n} clients ...", flush=True)
            figures.append(simulate(n, args, base / f"clients-{n}"))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"command: fedfuse bench scale --clients {args.clients} --rounds {args.rounds} --fraction {args.fraction:g} "
        f"--samples-per-client {args.samples_per_client}"
    )
    print('synthetic data, encoders = "federated", DP on; round s = results.json rounds[i].seconds (train + evaluate)')
    header = f"{'round':>5}" + "".join(f" | {f['clients']:>5} clients: s (trained)" for f in figures)
    print(header)
    for i in range(max(len(f["rounds"]) for f in figures)):
        cells = []
        for f in figures:
            r = f["rounds"][i] if i < len(f["rounds"]) else None
            cells.append(f" | {r['seconds']:>12.1f} ({r['trained']:>4})" if r else f" | {'':>19}")
        print(f"{i + 1:>5}" + "".join(f"{c:<28}" for c in cells))
    print(f"{'peak':>5}" + "".join(f" | {f['peak_bytes'] / 2**20:>9.0f} MiB process tree " for f in figures))
    print(f"{'wall':>5}" + "".join(f" | {f['wall_seconds']:>9.0f} s whole run (start-up included)" for f in figures))
    print(f"{'json':>5}" + "".join(f" | {f['results_bytes'] / 1024:>9.0f} KiB results.json            " for f in figures))
    print(f"{'state':>5}" + "".join(f" | {f['state_folders']:>5} client state folders on disk" for f in figures))
    return 0
