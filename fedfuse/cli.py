"""The ``fedfuse`` command: one subcommand per job, each in ``fedfuse/commands/<name>.py``."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from typing import Any

from common.errors import FedfuseError
from common.logs import setup_logging

# Subcommand -> (module under fedfuse.commands, one-line help). Modules are imported lazily so that
# `fedfuse audit` does not pay for importing Flower and Ray.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulate", "run a federated simulation locally (Flower simulation engine)"),
    "data": ("data", "validate site data folders and import public datasets"),
    "plan": ("plan", "before a private run: each site's noise and the noise-to-signal ratio, from public parameters"),
    "audit": ("audit", "verify privacy ledgers and re-account every client's epsilon"),
    "certs": ("certs", "create the CA, SuperLink certificate and site keys for a deployment"),
    "site": ("site", "run a deployment site's SuperNode with the warm executor (fast rounds)"),
    "sites": ("sites", "the SuperNodes registered at a SuperLink, by site name, and whether they are online"),
    "bench": ("bench", "benchmarks: dp-overhead, round-overhead, deploy-round, hapt, av-digits"),
    "pretrain": ("pretrain", "train one modality's encoder on PUBLIC data (no DP) to warm-start runs (model.init)"),
    "report": ("report", "write a run's self-contained HTML report (scores, modality contributions, privacy)"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The parser; only the command named in ``argv`` is imported and configured (commands pull in torch)."""
    parser = argparse.ArgumentParser(prog="fedfuse", description="fedfuse: federated, privacy-preserving multi-modal training")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and the other libraries' INFO lines and warnings"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules: dict[str, Any] = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"fedfuse.commands.{module_name}")
            if "argv" in inspect.signature(module.configure).parameters:  # a command with sub-commands of its own
                module.configure(command, argv=argv[argv.index(name) + 1 :])
            else:
                module.configure(command)
            modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, modules = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose, flower=False)  # a command that runs Flower quiets it too
    try:
        return int(modules[args.command].run(args) or 0)
    except FedfuseError as exc:
        print(f"fedfuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedfuse {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
