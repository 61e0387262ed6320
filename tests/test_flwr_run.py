"""`flwr run .` runs the same apps through a (local, detached) SuperLink. Slow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.offline import flower_environment

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _kill_processes_mentioning(marker: str) -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def test_flwr_run_uses_the_same_apps(tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="ffray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = os.environ | {
        **flower_environment(home),
        "RAY_TMPDIR": ray_tmp,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    config = f'num-server-rounds=2 out-dir="{out}" data.num-clients=3 data.samples-per-client=300 data.groups="image;signal;image+signal"'
    try:
        done = subprocess.run(
            ["flwr", "run", ".", "--run-config", config, "--federation-config", "num-supernodes=3", "--stream"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        _kill_processes_mentioning(str(home))  # the detached local SuperLink and its simulation process
        _kill_processes_mentioning(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "results.json").exists(), done.stdout[-4000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2]
    assert sorted(results["privacy"]["clients"]) == ["client-00", "client-01", "client-02"]
