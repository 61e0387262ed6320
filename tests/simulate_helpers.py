"""Running `fedfuse simulate` in a subprocess for tests that kill it: never leak a process or a Ray folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from simulations.runner import remove_ray_folders


def run_processes(out: Path) -> list[int]:
    """Pids of processes started for the run in ``out`` (Ray's included: their environment names its FLWR_HOME)."""
    marker = f"FLWR_HOME={out.resolve() / '.flwr'}".encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def leftovers(out: Path, wait: float) -> list[str]:
    """Command lines of the run's processes still alive after ``wait`` s (Ray takes a moment to exit); killed."""
    deadline = time.monotonic() + wait
    while run_processes(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for pid in run_processes(out):
        try:
            left.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200])
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def kill_run(proc: subprocess.Popen, out: Path) -> None:
    """Kill the simulation's process group, any process of the run that left it, and its Ray temp folder."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pid in run_processes(out):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    remove_ray_folders(out)


def simulate(args: list[str], out: Path, *, until: Callable[[], bool] | None = None, timeout: float = 300) -> None:
    """Run ``fedfuse simulate ARGS`` in its own process group until it exits, or kill it once ``until()`` holds."""
    log = out.parent / f"simulate-{time.monotonic_ns()}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedfuse.cli", "simulate", *args, "--quiet"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline and not (until and until()):
            time.sleep(0.1)
        assert until is None or until(), f"the run ended or timed out first:\n{log.read_text()[-2000:]}"
        assert until is not None or proc.returncode == 0, log.read_text()[-2000:]
    finally:
        if until is not None or proc.returncode != 0:  # killed on purpose, failed or timed out
            kill_run(proc, out)


def checkpoint_reached(out: Path, round_: int) -> Callable[[], bool]:
    """A condition for :func:`simulate`: the run's last complete checkpoint is round ``round_`` or later."""
    import json

    latest = out / "checkpoints" / "latest.json"

    def reached() -> bool:
        try:
            return latest.exists() and json.loads(latest.read_text())["round"] >= round_
        except ValueError:  # caught mid-replace
            return False

    return reached
