"""``fedfuse plan``: the noise each site of a federation will get, and settings that keep the signal (common/privacy/plan.py)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from common.config import RunConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="a folder of site folders (one client per site)")
    parser.add_argument("--scenario", type=Path, help="scenario TOML file (run-config keys)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key, e.g. --set dp.epsilon=4 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")


def make_plans(config: RunConfig) -> dict[str, Any]:
    """The configured setting, every candidate (ranked with RDP), and the suggested one, for ``config``'s sites."""
    from common.privacy.plan import RANKING_ACCOUNTANT, candidates, configured_setting, federation_sizes, plan, suggest

    sites, budgets, head = federation_sizes(config)
    base = configured_setting(config)  # with fraction-train < 1, each site calibrates for its planned share of rounds
    kwargs: dict[str, Any] = dict(epsilon=budgets, delta=config.dp.delta)
    ranked = [
        plan(sites, head, s, accountant=RANKING_ACCOUNTANT, **kwargs)
        for s in candidates(base, max(n for n, _ in sites.values()), config)
    ]
    suggested = suggest(ranked, base).setting
    chosen = {base: plan(sites, head, base, accountant=config.dp.accountant, **kwargs)}
    if suggested != base:
        chosen[suggested] = plan(sites, head, suggested, accountant=config.dp.accountant, **kwargs)
    return {"configured": chosen[base], "suggested": chosen[suggested], "candidates": ranked}


def run(args: argparse.Namespace) -> int:
    from common.config import parse_run_config
    from simulations.scenario import build_config

    flat = build_config(args.scenario, args.overrides + [f"data.dataset={json.dumps(str(args.data))}"])
    config = parse_run_config(flat)
    plans = make_plans(config)
    if args.json:
        print(json.dumps(_as_json(plans, config), indent=2))
        return 0
    _print(plans, config)
    return 0


def _as_json(plans: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    from common.privacy.plan import RANKING_ACCOUNTANT

    def one(p: Any) -> dict[str, Any]:
        return {
            "setting": p.setting.__dict__,
            "nsr_head": p.nsr_head,
            "head_params": p.head_params,
            "drowned": p.drowned,
            "sites": [s.__dict__ for s in p.sites],
        }

    return {
        "accountant": config.dp.accountant,
        "ranking_accountant": RANKING_ACCOUNTANT,
        "configured": one(plans["configured"]),
        "suggested": one(plans["suggested"]),
        "candidates": [one(p) for p in plans["candidates"]],
    }


def _print(plans: dict[str, Any], config: RunConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from common.privacy.plan import DROWNING, RANKING_ACCOUNTANT

    console = Console(width=None if sys.stdout.isatty() else 140)
    configured, suggested = plans["configured"], plans["suggested"]
    table = Table(title=f"Settings by the worst site's noise-to-signal ratio (NSR) per round (σ from {RANKING_ACCOUNTANT})")
    for column in ("batch", "rounds", "per site", "epochs", "σ (min-max)", "NSR/round, worst site", "NSR/round, head", ""):
        table.add_column(column, justify="right")
    for p in sorted(plans["candidates"], key=lambda p: max(s.nsr_round for s in p.sites)):
        sigmas = [s.noise_multiplier or 0.0 for s in p.sites]
        mark = "configured" if p.setting == configured.setting else ("suggested" if p.setting == suggested.setting else "")
        table.add_row(
            str(p.setting.batch_size),
            str(p.setting.rounds),
            str(p.setting.trained_rounds),
            str(p.setting.local_epochs),
            f"{min(sigmas):.2f}-{max(sigmas):.2f}",
            _fmt(max(s.nsr_round for s in p.sites)),
            _fmt(p.nsr_head),
            mark,
        )
    console.print(table)
    for label, p in (("configured", configured), ("suggested", suggested)):
        if label == "suggested" and p.setting == configured.setting:
            break
        sites = Table(title=f"{label}: {p.setting} (σ from {config.dp.accountant}, as the sites calibrate it)")
        for column in ("site", "n", "q", "expected batch", "steps/round", "σ", "NSR/step", "NSR/round", "params"):
            sites.add_column(column, justify="left" if column == "site" else "right")
        for s in p.sites:
            sites.add_row(
                s.site,
                str(s.n),
                f"{s.sample_rate:.3g}",
                f"{s.expected_batch:.1f}",
                str(s.steps_per_round),
                "non-private" if s.noise_multiplier is None else f"{s.noise_multiplier:.3f}",
                _fmt(s.nsr_step),
                _fmt(s.nsr_round) + (" !" if s.drowned else ""),
                str(s.params),
            )
        console.print(sites)
        console.print(f"aggregated head ({p.head_params} parameters): NSR/round {_fmt(p.nsr_head)}")
    if configured.drowned:
        console.print(
            f"[bold yellow]warning:[/] with the configured setting, noise drowns the signal at "
            f"{len(configured.drowned)} site(s) (NSR/round > {DROWNING:g}): {', '.join(configured.drowned[:8])}"
            + (" ..." if len(configured.drowned) > 8 else "")
        )
    if suggested.setting != configured.setting:
        console.print(
            f"suggested: --set train.batch-size={suggested.setting.batch_size} --set num-server-rounds="
            f"{suggested.setting.rounds} --set train.local-epochs={suggested.setting.local_epochs}"
        )
    console.print(
        "NSR: the Gaussian noise's norm over the largest possible clipped-gradient signal, σ·√d / (B·√T) for a "
        "site's round; a best case: real gradients agree less (docs: README, Data)"
    )


def _fmt(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3g}"
