"""The ``fedfuse`` command: one subcommand per job, each in ``common/commands/<name>.py``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from common.errors import FedfuseError

# Subcommand -> (module under common.commands, one-line help). Modules are imported lazily so that
# `fedfuse audit` does not pay for importing Flower and Ray.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulate", "run a federated simulation locally (Flower simulation engine)"),
    "data": ("data", "validate site data folders and import public datasets"),
    "audit": ("audit", "verify privacy ledgers and re-account every client's epsilon"),
    "certs": ("certs", "create the CA, SuperLink certificate and site keys for a deployment"),
    "site": ("site", "run a deployment site's SuperNode with the warm executor (fast rounds)"),
    "bench": ("bench", "measure overheads (dp-overhead, round-overhead)"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="fedfuse", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules: dict[str, object] = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"common.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"common.commands.{module_name}":
                raise
            continue  # not built yet
        module.configure(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(modules[args.command].run(args) or 0)
    except FedfuseError as exc:
        print(f"fedfuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedfuse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
