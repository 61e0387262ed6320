"""``fedfuse bench NAME``: run one benchmark (see simulations/bench/)."""

from __future__ import annotations

import argparse
import importlib

from simulations.bench import BENCHMARKS


def configure(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """One sub-parser per benchmark; only the one named in ``argv`` is imported (benchmarks import torch)."""
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    chosen = next((a for a in argv or [] if not a.startswith("-")), None)
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        module = importlib.import_module(f"simulations.bench.{module_name}")
        module.configure(p)
        p.set_defaults(_bench=module)


def run(args: argparse.Namespace) -> int:
    return int(args._bench.run(args) or 0)
