"""``fedfuse report``: one self-contained HTML page of a run (common/insight/report.py); the contributions table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.insight.report import REPORT_FILE, write_report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run folder (the --out of `fedfuse simulate`)")
    parser.add_argument("--out", metavar="FILE.html", type=Path, help=f"where to write the page (default RUN_DIR/{REPORT_FILE})")


def run(args: argparse.Namespace) -> int:
    path = write_report(args.run_dir, args.out)
    print(f"report: {path}")
    return 0


def print_contributions(results: dict[str, Any]) -> None:
    """The final round's modality contributions as a table (nothing when the run has none)."""
    from rich.console import Console
    from rich.table import Table

    mc = (results.get("final") or {}).get("modality_contributions") or {}
    acc, f1 = ((mc.get("overall") or {}).get(m) or {} for m in ("accuracy", "macro_f1"))
    console = Console(width=None if sys.stdout.isatty() else 120)
    if "shapley" not in acc:
        if acc.get("error"):
            console.print(f"Modality contributions: none for the federation ({acc['error']})")
        return
    attention = mc.get("attention") or {}
    table = Table(
        title=f"Modality contributions (Shapley values over chance = {mc['empty_value']:.3f}, "
        f"{mc.get('source', '')} held-out figures)"
    )
    for column in ("modality", "accuracy alone", "Shapley accuracy", "Shapley macro-F1", "mean attention"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for m, phi in acc["shapley"].items():
        weights = list((attention.get(m) or {}).values())
        table.add_row(
            m,
            f"{acc['alone'][m]:.3f}",
            f"{phi:+.3f}",
            f"{(f1.get('shapley') or {}).get(m, float('nan')):+.3f}",
            f"{sum(weights) / len(weights):.3f}" if weights else "-",
        )
    console.print(table)
    pairs = ", ".join(f"{p.replace('+', ' × ')} {v:+.3f}" for p, v in (acc.get("interactions") or {}).items())
    if pairs:
        console.print(f"Interactions (accuracy; > 0: they cooperate, < 0: redundant): {pairs}")
    for warning in mc.get("warnings") or []:
        console.print(f"[bold yellow]warning:[/] {warning}")
