"""``fedfuse bench NAME``: run one benchmark (see simulations/bench/)."""

from __future__ import annotations

import argparse
import importlib

from simulations.bench import BENCHMARKS


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"simulations.bench.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"simulations.bench.{module_name}":
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)
        p.set_defaults(_bench=module)


def run(args: argparse.Namespace) -> int:
    return int(args._bench.run(args) or 0)
