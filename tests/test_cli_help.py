"""`fedfuse --help` and each command's `--help` import none of the heavy libraries (they answer at once)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedfuse.cli import SUBCOMMANDS
from simulations.bench import BENCHMARKS

# Libraries that take seconds to import on a small machine; `--help` must not need any of them.
HEAVY = ("torch", "flwr", "opacus", "ray", "matplotlib", "dp_accounting", "scipy", "safetensors")

PROBE = """
import contextlib, io, json, sys
from fedfuse.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "help": out.getvalue(), "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}))
"""


def help_of(*argv: str) -> dict:
    """Run `fedfuse ARGV --help` in a fresh interpreter; its exit code, help text and the heavy modules it imported."""
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", code, *argv, "--help"], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_top_level_help_lists_every_command_and_imports_nothing_heavy():
    result = help_of()
    assert result["code"] == 0
    assert all(name in result["help"] for name in SUBCOMMANDS)
    assert result["heavy"] == []


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_each_command_help_imports_nothing_heavy(command):
    result = help_of(command)
    assert result["code"] == 0 and result["help"].startswith(f"usage: fedfuse {command}")
    assert result["heavy"] == [], f"`fedfuse {command} --help` imports {result['heavy']}"


@pytest.mark.parametrize("name", sorted(set(BENCHMARKS) - {"dp-overhead"}))  # dp-overhead's module is torch code
def test_each_benchmark_help_imports_nothing_heavy(name):
    result = help_of("bench", name)
    assert result["code"] == 0 and result["help"].startswith(f"usage: fedfuse bench {name}")
    assert result["heavy"] == [], f"`fedfuse bench {name} --help` imports {result['heavy']}"


def test_a_benchmark_still_gets_its_own_options():
    assert "--repeats" in help_of("bench", "dp-overhead")["help"]
