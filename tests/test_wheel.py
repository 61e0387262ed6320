"""The built wheel, installed into a fresh virtual environment, simulates from a folder outside the checkout
(and prints fedfuse's lines only).

Offline: the wheel is built without build isolation (setuptools comes with the test extras) and installed
without dependencies; the fresh environment finds the pinned dependencies through a path file pointing at
this environment's site-packages (only the dependencies: this checkout's packages are not on that path).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from common.offline import OFFLINE_FLOWER

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "tests"
)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy, so that the checkout gets no build/ or egg-info folder.
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    built = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        timeout=300,
    )
    assert "Warning" not in built.stderr, built.stderr  # setuptools' licence deprecations and the like
    (path,) = (tmp / "dist").glob("fedfuse-*.whl")
    return path


def test_the_wheel_declares_its_licence(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "simulations/scenarios/default.toml" in names
    assert not any(n.startswith("tests/") for n in names)


def test_the_installed_wheel_simulates_outside_the_checkout(wheel, tmp_path):
    # Prepare: a fresh environment holding the wheel, with the dependencies of this one
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # Without this process's PYTHONPATH (an in-process simulation earlier in the session puts the checkout on it,
    # and pip would then take the checkout's fedfuse as installed and skip the wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], env=env)
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env |= OFFLINE_FLOWER
    where = run(
        [str(python), "-c", "import common, simulations; print(common.__file__, simulations.__file__)"], cwd=elsewhere, env=env
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    out = elsewhere / "run"
    # Execute: a tiny simulation through the installed console script
    done = subprocess.run(
        [
            str(venv / "bin" / "fedfuse"),
            "simulate",
            "--out",
            str(out),
            "--set",
            "num-server-rounds=1",
            "--set",
            "data.num-clients=2",
            "--set",
            "data.samples-per-client=200",
            "--set",
            'data.groups="image+signal;tabular"',
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Assert: it completed and wrote its results, plots and report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1]
    assert (out / "accuracy.png").exists() and (out / "report.html").exists()
    # and its log holds fedfuse's lines only (no alembic, Ray or Flower bookkeeping), one per round and stage
    log = done.stderr.splitlines()
    assert log and all(line.startswith(("INFO fedfuse.", "WARNING fedfuse.")) for line in log), done.stderr
    assert sum(line.startswith("INFO fedfuse.server: round 1/1 |") for line in log) == 1
    assert len(log) <= 8, done.stderr
    for noise in ("alembic", "FutureWarning", "Manually terminating", "httpx"):
        assert noise not in done.stdout + done.stderr
