"""``fedfuse audit``: verify privacy ledgers and re-account every client's epsilon independently;
``fedfuse audit --empirical``: a canary audit of the DP-SGD training path itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.config import ACCOUNTANTS
from common.errors import ConfigError
from common.privacy.audit import (
    DEFAULT_TOLERANCE,
    EXIT_CODES,
    EXIT_EMPIRICAL,
    EXIT_OK,
    audit_path,
    format_report,
    plot_report,
    report_json,
)
from common.privacy.ledger import ACCOUNTING, CORRUPT, OVER_BUDGET, TAMPERING, LedgerError

# --empirical options, named as EmpiricalAuditConfig's fields (the defaults are there).
EMPIRICAL_OPTIONS = ("epsilon", "delta", "canaries", "steps", "sample_rate", "real_samples", "accountant", "seed")

EPILOG = f"""\
PATH is a run's output folder (federation copies in PATH/ledgers/<client>.jsonl, client copies in
PATH/clients/<client>/ledger.jsonl, compared when both exist), a site's state folder (its ledger.jsonl),
a folder of *.jsonl ledgers, or one ledger file; a state folder's or a file's ledger belongs to the
client its entries name. In a run folder, every client that results.json records a privacy spend for,
and (--keys) every client with a pinned key, must have a ledger: --keys is what makes the server's
copies trustworthy. The audit only reads: it writes a plot only when --plot is given.

--empirical (no PATH) is a run of its own: it trains m canaries (each included with probability
1/2) beside real synthetic samples through the project's DP-SGD round (common/privacy/training.py: Poisson
sampling, clipping, noise calibrated for --epsilon), scores each canary from the training iterates
and prints a lower bound on epsilon at 95% confidence (Steinke, Nasr, Jagielski 2023) beside the
epsilon the accountant claims. The DP noise is OS-seeded, so the bound varies between runs;
--seed fixes the canaries, the real data and the initial weights. Details: docs/ledger-format.md.

exit status (when several apply, the first in this list wins):
  {EXIT_OK}  every ledger verifies, recorded and recomputed epsilon agree, no budget was exceeded
  {EXIT_CODES[TAMPERING]}  tampering: an entry was edited, forged, reordered, dropped or inserted, a copy is
     truncated, the client's two copies differ, (--keys) a ledger is not signed by its pinned key, or a
     client that results.json or --keys names has no ledger at all
  {EXIT_CODES[CORRUPT]}  corrupt: a ledger cannot be read, has a partial or invalid line, or malformed fields
  {EXIT_CODES[OVER_BUDGET]}  over budget: a round's recorded or recomputed epsilon exceeds the client's budget,
     or a round refused for budget still trained
  {EXIT_CODES[ACCOUNTING]}  accounting disagreement: recorded epsilon is outside the tolerance of the
     recomputed one (below it = spend under-reported), or it fell between rounds
  {EXIT_EMPIRICAL}  (--empirical) the empirical lower bound exceeds the claimed epsilon: training is less
     private than its accounting says
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
    parser.add_argument(
        "path",
        metavar="PATH",
        type=Path,
        nargs="?",
        help="run output folder, site state folder, folder of ledgers, or a ledger (not with --empirical)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE", type=Path, help="write a PNG of epsilon per round per client")
    parser.add_argument(
        "--keys",
        metavar="DIR",
        type=Path,
        help="pinned ledger public keys, DIR/<client_id>.pem (e.g. superlink/ledger-keys from `fedfuse certs`)",
    )
    parser.add_argument(
        "--tolerance",
        metavar="X",
        type=_tolerance,
        default=None,
        help=f"recorded and recomputed epsilon agree within X * max(1, recomputed) (default {DEFAULT_TOLERANCE})",
    )
    emp = parser.add_argument_group("empirical audit (--empirical; defaults: the setup in docs/ledger-format.md)")
    emp.add_argument("--empirical", action="store_true", help="run the one-run canary audit of DP-SGD training")
    emp.add_argument("--epsilon", type=float, help="target epsilon the noise is calibrated for (default 8)")
    emp.add_argument("--delta", type=float, help="delta of the claim and of the lower bound (default 1e-5)")
    emp.add_argument("--canaries", type=int, metavar="M", help="number of canaries, each included w.p. 1/2 (default 1000)")
    emp.add_argument("--steps", type=int, help="DP-SGD steps, a multiple of 1/sample-rate (default 200)")
    emp.add_argument("--sample-rate", type=float, metavar="Q", help="Poisson sampling rate, 1/k for a whole k (default 0.02)")
    emp.add_argument("--real-samples", type=int, metavar="N", help="real synthetic samples trained alongside (default 500)")
    emp.add_argument("--accountant", choices=ACCOUNTANTS, help="accountant that calibrates and claims (default prv)")
    emp.add_argument("--seed", type=int, help="canary inclusion, real data, initial weights; never the DP noise (default 0)")


def run(args: argparse.Namespace) -> int:
    given = [f"--{o.replace('_', '-')}" for o in EMPIRICAL_OPTIONS if getattr(args, o) is not None]
    if args.empirical:
        ledger_only = [
            name
            for name, value in (
                ("PATH", args.path),
                ("--plot", args.plot),
                ("--keys", args.keys),
                ("--tolerance", args.tolerance),
            )
            if value is not None
        ]
        if ledger_only:
            raise ConfigError(f"--empirical is an audit run of its own: drop {', '.join(ledger_only)}")
        return _run_empirical(args)
    if args.path is None:
        raise ConfigError("give PATH (a run folder, a folder of ledgers or a ledger file), or --empirical")
    if given:
        raise ConfigError(f"{', '.join(given)} apply to --empirical only")
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    report = audit_path(args.path, tolerance=tolerance, keys=args.keys)
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


def _run_empirical(args: argparse.Namespace) -> int:
    import torch

    from common.privacy.empirical_audit import EmpiricalAuditConfig, format_empirical_report, run_empirical_audit

    # Small per-step batches: more threads only contend (measured 174 s instead of 8 s on 2 busy cores).
    torch.set_num_threads(1)
    options = {o: getattr(args, o) for o in EMPIRICAL_OPTIONS if getattr(args, o) is not None}
    report = run_empirical_audit(EmpiricalAuditConfig(**options))
    print(json.dumps(report, indent=2, allow_nan=False) if args.json else format_empirical_report(report))
    return EXIT_OK if report["passed"] else EXIT_EMPIRICAL
