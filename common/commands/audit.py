"""``fedfuse audit``: verify privacy ledgers and re-account every client's epsilon independently."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.audit import DEFAULT_TOLERANCE, EXIT_CODES, EXIT_OK, audit_path, format_report, plot_report, report_json
from common.ledger import ACCOUNTING, CORRUPT, OVER_BUDGET, TAMPERING, LedgerError

EPILOG = f"""\
PATH is a run's output folder (federation copies in PATH/ledgers/<client>.jsonl, client copies in
PATH/clients/<client>/ledger.jsonl, compared when both exist), a folder of *.jsonl ledgers, or one
ledger file. The audit only reads: it writes a plot only when --plot is given.

exit status (when several apply, the first in this list wins):
  {EXIT_OK}  every ledger verifies, recorded and recomputed epsilon agree, no budget was exceeded
  {EXIT_CODES[TAMPERING]}  tampering: an entry was edited, forged, reordered, dropped or inserted, a copy is
     truncated, the client's two copies differ, or (--keys) a ledger is not signed by its pinned key
  {EXIT_CODES[CORRUPT]}  corrupt: a ledger cannot be read, has a partial or invalid line, or malformed fields
  {EXIT_CODES[OVER_BUDGET]}  over budget: a round's recorded or recomputed epsilon exceeds the client's budget,
     or a round refused for budget still trained
  {EXIT_CODES[ACCOUNTING]}  accounting disagreement: recorded epsilon is outside the tolerance of the
     recomputed one (below it = spend under-reported), or it fell between rounds
  2  usage error (bad arguments, no ledgers found); 1 = a bug in fedfuse
"""


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("path", metavar="PATH", type=Path, help="run output folder, folder of ledgers, or a ledger")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE", type=Path, help="write a PNG of epsilon per round per client")
    parser.add_argument(
        "--keys", metavar="DIR", type=Path,
        help="pinned ledger public keys, DIR/<client_id>.pem (e.g. superlink/ledger-keys from `fedfuse certs`)",
    )
    parser.add_argument(
        "--tolerance", metavar="X", type=_tolerance, default=DEFAULT_TOLERANCE,
        help=f"recorded and recomputed epsilon agree within X * max(1, recomputed) (default {DEFAULT_TOLERANCE})",
    )


def run(args: argparse.Namespace) -> int:
    report = audit_path(args.path, tolerance=args.tolerance, keys=args.keys)
    if args.plot is not None:
        plot = args.plot
        ledgers = {p.resolve() for c in report.clients.values() for p in c.sources.values()}
        if plot.suffix.lower() != ".png":
            raise LedgerError(f"--plot writes a PNG: give a file name ending in .png, got {plot}")
        if plot.resolve() in ledgers:
            raise LedgerError(f"--plot {plot} is one of the audited ledgers: choose another file")
        plot_report(report, plot)
    print(report_json(report) if args.json else format_report(report))
    if args.plot is not None and not args.json:
        print(f"plot: {args.plot}")
    return report.exit_status
