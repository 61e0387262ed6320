"""Audit privacy ledgers: verify chains and copies, re-account epsilon with dp-accounting, check budgets.

The re-accounting is independent of Opacus, which the clients use in training: a ledger that
records accountant "prv" is re-accounted with dp-accounting's PLD accountant, "rdp" with
dp-accounting's RDP accountant. The tolerance is one-sided (docs/ledger-format.md, measured):

- a recorded epsilon *below* the recomputed one (under-report) is tolerated only by the independent
  accountant's own discretisation error: for "prv" it is compared with PLD at the fine interval
  (1e-4, whose error is below 3e-4 where measured) and may lie at most UNDER_REPORT_SLACK below it;
  for "rdp" (format 2: integer orders on both sides, equal to 1e-12) only float rounding;
- a recorded epsilon *above* the recomputed one (the safe side) may exceed it by at most
  ``tolerance * max(1, recomputed)`` (Opacus's PRV is an upper bound about 0.01 above PLD); more means
  the recorded mechanisms do not explain the recorded epsilon;
- a budget is exceeded when the recorded or the recomputed epsilon is over it: no slack.

Legacy: "rdp" entries of format 1 were accounted over Opacus's fractional orders, which dp-accounting
evaluates only approximately; they keep the symmetric ``tolerance`` of format 1.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.privacy.ledger import (
    ACCOUNTING,
    CORRUPT,
    LEDGER_FILE,
    OVER_BUDGET,
    TAMPERING,
    Finding,
    LedgerError,
    check_chain,
    compare_copies,
    format_problems,
    load_public_key_hex,
    read_ledger,
)
from common.privacy.spend import format_spend

RESULTS_FILE = "results.json"  # a run folder's results (server/run_folder.py): its privacy.clients is the roster
TRAIN_LOG = "train_log.jsonl"  # a site's training log beside its ledger (client/state.py): not a ledger

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.02  # over-report (safe side) only; measured PRV - PLD: +0.010 to +0.012 for eps in [0.1, 54]
PLD_INTERVAL = 1e-3  # dp-accounting PLD value discretization of the first pass (~10x faster than 1e-4)
PLD_FINE_INTERVAL = 1e-4  # used when a recorded epsilon lies below the first pass: 1e-3 can be 0.027 too high
UNDER_REPORT_SLACK = 1e-3  # PLD(1e-4) - PLD(1e-5) measured <= 0.0003; honest PRV lies >= 0.009 above PLD(1e-4)
BUDGET_SLACK = 1e-9  # float noise allowed when comparing an epsilon with its budget
# Integer RDP orders: Opacus and dp-accounting agree on them exactly (dp-accounting's fractional orders are an
# approximation, up to 30 % off below order 2). Format-2 "rdp" ledgers are accounted over these on both sides.
RDP_ORDERS = tuple(float(a) for a in range(2, 257))

# Exit statuses; when several apply the lowest wins (tampering first). 2 = usage error (argparse, FedfuseError).
EXIT_OK = 0
EXIT_CODES = {TAMPERING: 3, CORRUPT: 4, OVER_BUDGET: 5, ACCOUNTING: 6}
EXIT_EMPIRICAL = 7  # `fedfuse audit --empirical`: the canary lower bound exceeds the claimed epsilon
RECOMPUTED_WITH = {"prv": "dp-accounting PLD", "rdp": "dp-accounting RDP"}
COPIES = ("client", "federation", "file")  # where a copy came from; "file" = a loose ledger file


def allowance(recomputed: float, tolerance: float) -> float:
    """How far a recorded epsilon may lie from the recomputed one: tolerance * max(1, recomputed)."""
    return tolerance * max(1.0, recomputed)


@lru_cache(maxsize=4096)
def _epsilon(
    history: tuple[tuple[float, float, int], ...], delta: float, accountant: str, fine: bool = False, legacy: bool = False
) -> float:
    # Imported here, not at module level: dp_accounting takes seconds to import (`fedfuse audit --help` stays fast).
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    events = []
    for sigma, q, steps in history:
        step = dp_accounting.GaussianDpEvent(sigma)
        if q < 1:
            step = dp_accounting.PoissonSampledDpEvent(q, step)
        events.append(dp_accounting.SelfComposedDpEvent(step, steps))
    if accountant == "prv":
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_FINE_INTERVAL if fine else PLD_INTERVAL)
    elif legacy:  # format-1 "rdp" entries: dp-accounting's default orders, as they were audited
        acc = rdp_privacy_accountant.RdpAccountant()
    else:
        acc = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def epsilon_from_history(
    history: list[tuple[float, float, int]], *, delta: float, accountant: str, fine: bool = False, legacy: bool = False
) -> float:
    """Epsilon of a (noise_multiplier, sample_rate, steps) history with dp-accounting (PLD for "prv", RDP for "rdp").

    Mechanisms are composed in any order (composition commutes), identical ones merged first.
    A noise multiplier of 0 with steps > 0 gives inf; an empty history 0. ``fine``: PLD at PLD_FINE_INTERVAL;
    ``legacy``: RDP over dp-accounting's default orders (format-1 ledgers) instead of RDP_ORDERS.
    """
    if accountant not in RECOMPUTED_WITH:
        raise LedgerError(f"unknown accountant '{accountant}', expected one of {sorted(RECOMPUTED_WITH)}")
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps > 0:
            if sigma <= 0:
                return math.inf
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    if not merged:
        return 0.0
    key = tuple(sorted((s, q, n) for (s, q), n in merged.items()))
    return _epsilon(key, float(delta), accountant, fine and accountant == "prv", legacy and accountant == "rdp")


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class ClientReport:
    """Everything the audit found about one client."""

    client_id: str
    sources: dict[str, Path]  # copy name -> file
    entries: list[dict[str, Any]] = field(default_factory=list)  # the copy that was accounted
    accounted_copy: str | None = None
    recomputed: list[float | None] = field(default_factory=list)  # per entry; None = not accountable
    run_recomputed: dict[int, float] = field(default_factory=dict)  # entry index -> its run's own epsilon (format 2)
    findings: list[Finding] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        return self.entries[-1] if self.entries else {}

    @property
    def private(self) -> bool:
        """False once any entry trained without DP: the client's epsilon is infinite from then on."""
        trained_non_private = any(
            e.get("private") is False
            and isinstance(e.get("mechanism"), dict)
            and isinstance(e["mechanism"].get("steps"), int)
            and e["mechanism"]["steps"] > 0
            for e in self.entries
        )
        return not trained_non_private and self.last.get("private") is not False

    @property
    def kinds(self) -> set[str]:
        return {f.kind for f in self.findings}

    @property
    def verified(self) -> bool:
        return not self.kinds & {TAMPERING, CORRUPT}

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def status(self) -> str:
        if self.findings:
            return ", ".join(k for k in EXIT_CODES if k in self.kinds)
        return "ok" if self.private else "ok (non-private)"

    @property
    def rounds(self) -> int:
        return sum(1 for e in self.entries if e.get("status") == "trained")

    @property
    def refused_rounds(self) -> int:
        return sum(1 for e in self.entries if e.get("status") == "refused-budget")

    @property
    def discarded_rounds(self) -> int:
        """Rounds that used the data (and are charged) but failed, so no update was sent."""
        return sum(1 for e in self.entries if e.get("status") == "discarded")

    @property
    def modalities(self) -> list[str]:
        seen: list[str] = []
        for e in self.entries:
            mods = e.get("modalities")
            for m in mods if isinstance(mods, list) else []:
                if isinstance(m, str) and m not in seen:
                    seen.append(m)
        return seen

    @property
    def history(self) -> list[dict[str, Any]]:
        """Trained mechanisms, consecutive identical ones merged (Opacus's accountant history format)."""
        out: list[dict[str, Any]] = []
        for e in self.entries:
            mech = e.get("mechanism")
            if not isinstance(mech, dict) or not isinstance(mech.get("steps"), int) or mech["steps"] <= 0:
                continue
            sigma, q, steps = mech.get("noise_multiplier"), mech.get("sample_rate"), mech["steps"]
            if out and out[-1]["noise_multiplier"] == sigma and out[-1]["sample_rate"] == q:
                out[-1]["steps"] += steps
            else:
                out.append({"noise_multiplier": sigma, "sample_rate": q, "steps": steps})
        return out

    def to_json(self) -> dict[str, Any]:
        last = self.last
        rec = self.recomputed[-1] if self.recomputed else None
        return {
            "epsilon": last.get("epsilon"),
            "recomputed_epsilon": rec if rec is not None and math.isfinite(rec) else None,
            "delta": last.get("delta"),
            "budget": last.get("budget"),
            "private": self.private,
            "accountant": last.get("accountant"),
            "history": self.history,
            "verified": self.verified,
            "ok": self.ok,
            "status": self.status,
            "problems": [f"{f.kind}: {f.message}" for f in self.findings],
            "modalities": self.modalities,
            "rounds": self.rounds,
            "refused_rounds": self.refused_rounds,
            "discarded_rounds": self.discarded_rounds,
            "sources": {k: str(v) for k, v in self.sources.items()},
            "accounted_copy": self.accounted_copy,
            "per_entry": [
                {
                    "index": i,
                    "run_id": e.get("run_id"),
                    "round": e.get("round"),
                    "status": e.get("status"),
                    "epsilon": e.get("epsilon"),
                    "recomputed_epsilon": r if r is not None and math.isfinite(r) else None,
                    "budget": e.get("budget"),
                    "run_epsilon": e.get("run_epsilon"),
                    "recomputed_run_epsilon": _finite(self.run_recomputed.get(i)),
                    "run_budget": e.get("run_budget", e.get("budget") if e.get("version") == 1 else None),
                    "version": e.get("version"),
                }
                for i, (e, r) in enumerate(zip(self.entries, self.recomputed))
            ],
        }


@dataclass
class AuditReport:
    """The audit of every ledger found under one path."""

    path: Path
    tolerance: float
    clients: dict[str, ClientReport]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.clients.values())

    @property
    def exit_status(self) -> int:
        kinds = set().union(*(c.kinds for c in self.clients.values()))
        codes = [code for kind, code in EXIT_CODES.items() if kind in kinds]
        return min(codes) if codes else EXIT_OK

    def tolerance_text(self) -> str:
        return (
            f"one-sided: an under-report (recorded ε below recomputed) fails beyond the independent accountant's "
            f"own error ('prv': {UNDER_REPORT_SLACK:g} against dp-accounting PLD at interval "
            f"{PLD_FINE_INTERVAL:g}; 'rdp': float rounding, dp-accounting RDP over integer orders 2-256); an "
            f"over-report fails beyond {self.tolerance:g} × max(1, ε_recomputed); recorded or recomputed ε over "
            f"a budget fails with no slack. Lifetime ε is checked against the site's cap, run ε (format 2) "
            f"against the run's allowance. Format-1 'rdp' entries keep the symmetric ±{self.tolerance:g} × "
            f"max(1, ε) of format 1"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "clients": {cid: c.to_json() for cid, c in self.clients.items()},
            "tolerance": self.tolerance,
            "tolerance_rule": self.tolerance_text(),
            "ok": self.ok,
            "exit_status": self.exit_status,
        }


# --- finding ledgers ----------------------------------------------------------------------------


def _client_of(path: Path) -> str | None:
    """The client id a ledger file's entries name (None if it has no readable entry that names one)."""
    entries, _ = read_ledger(path)
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("client_id"), str) and e["client_id"]:
            return e["client_id"]
    return None


def find_ledgers(path: Path) -> dict[str, dict[str, Path]]:
    """Client id -> {copy name: file} for a run folder, a site's state folder, a folder of ledgers or one ledger file.

    A run folder files each client's copies under its name (checked against the entries by the audit); a state
    folder's ``ledger.jsonl`` or a loose ledger file belongs to the client its entries name (the file name says
    nothing: a site's ledger is always ``ledger.jsonl``). A state folder's ``train_log.jsonl`` is not a ledger.
    """
    path = Path(path)
    if path.is_file():
        return {_client_of(path) or path.stem: {"file": path}}
    if not path.is_dir():
        raise LedgerError(
            f"{path} does not exist: give a run's output folder, a site's state folder, a folder of ledgers or a ledger file"
        )
    found: dict[str, dict[str, Path]] = {}
    for p in sorted((path / "ledgers").glob("*.jsonl")):
        found.setdefault(p.stem, {})["federation"] = p
    for p in sorted((path / "clients").glob(f"*/{LEDGER_FILE}")):
        found.setdefault(p.parent.name, {})["client"] = p
    if not found and (path / LEDGER_FILE).is_file():  # a site's own state folder
        return {_client_of(path / LEDGER_FILE) or path.name: {"file": path / LEDGER_FILE}}
    if not found:
        for p in sorted(path.glob("*.jsonl")):
            if p.name != TRAIN_LOG:
                found.setdefault(_client_of(p) or p.stem, {})["file"] = p
    return found


def roster(path: Path) -> dict[str, str]:
    """Clients that must have a ledger under a run folder, from its results.json: client id -> why."""
    results = Path(path) / RESULTS_FILE
    if not results.is_file():
        return {}
    try:
        clients = json.loads(results.read_text())["privacy"]["clients"]
        return {
            cid: f"{RESULTS_FILE} records its privacy spend"
            for cid, rec in clients.items()
            if isinstance(rec, dict) and (rec.get("rounds_trained") or rec.get("epsilon") is not None)
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"{results} is unreadable ({exc}): the audit needs its list of clients") from exc


# --- auditing one client ------------------------------------------------------------------------


def audit_client(
    client_id: str,
    sources: dict[str, Path],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    expected_public_key: str | None = None,
) -> ClientReport:
    """Verify every copy of one client's ledger (against a pinned key if given), compare them, re-account one."""
    report = ClientReport(client_id=client_id, sources=dict(sources))
    try:
        _audit_client(report, tolerance, expected_public_key)
    except Exception as exc:  # a ledger must never crash the audit: report it and go on
        log.debug("auditing %s failed", client_id, exc_info=True)
        report.findings.append(Finding(CORRUPT, f"the audit could not process this ledger ({type(exc).__name__}: {exc})"))
    return report


def _audit_client(report: ClientReport, tolerance: float, expected_public_key: str | None) -> None:
    copies: dict[str, list[Any]] = {}
    integrity: dict[str, int] = {}
    for name, path in report.sources.items():
        entries, problems = read_ledger(path)
        found = [Finding(CORRUPT, p) for p in problems]
        found += [f for f in check_chain(entries, expected_public_key=expected_public_key) if f.kind in (TAMPERING, CORRUPT)]
        first = entries[0] if entries and isinstance(entries[0], dict) else {}
        if name != "file" and first and first.get("client_id") != report.client_id:
            found.append(
                Finding(
                    TAMPERING,
                    f"entry 0 is for client {first.get('client_id')!r}, but the ledger is filed as {report.client_id!r}",
                )
            )
        report.findings += [f._replace(message=f"{name} copy: {f.message}") for f in found]
        copies[name] = entries
        integrity[name] = len(found)
    if "client" in copies and "federation" in copies:
        report.findings += [
            Finding(TAMPERING, f"copies differ: {p}") for p in compare_copies(copies["client"], copies["federation"])
        ]
    if not copies:
        return
    # Account the copy with the fewest integrity problems, then the longest, then the client's own.
    order = {name: i for i, name in enumerate(COPIES)}
    best = min(copies, key=lambda n: (integrity[n], -len(copies[n]), order[n]))
    report.accounted_copy, report.entries = best, [e for e in copies[best] if isinstance(e, dict)]
    report.findings += [
        f._replace(message=f"{best} copy: {f.message}") for f in check_chain(report.entries) if f.kind == ACCOUNTING
    ]
    _account(report, tolerance)


def _number(value: Any) -> float:
    """A recorded epsilon or budget: null is infinity (format 2 writes an infinite epsilon, or no cap, as null)."""
    return math.inf if value is None else float(value)


def _account(report: ClientReport, tolerance: float) -> None:
    """Re-account every entry and check it against its recorded epsilons and budgets (module docstring: the rule)."""
    history: list[tuple[float, float, int]] = []
    runs: dict[Any, list[tuple[float, float, int]]] = {}  # run_id -> that run's own mechanisms
    accountable = True  # False after an entry whose mechanism cannot be read
    for i, e in enumerate(report.entries):
        where = f"entry {i} (run {e.get('run_id')!r}, round {e.get('round')!r})"
        mech = e.get("mechanism") if isinstance(e.get("mechanism"), dict) else {}
        steps = mech.get("steps")
        if format_problems(e):
            accountable = False  # already reported as corrupt
        elif steps > 0:
            # No noise (a non-private round): no finite epsilon from here on, in the history and in its run.
            sigma = 0.0 if e.get("private") is False else mech["noise_multiplier"]
            history.append((sigma, mech["sample_rate"], steps))
            if e.get("version", 1) >= 2:  # a format-1 entry (an older version) counts towards the lifetime cap only
                runs.setdefault(e.get("run_id"), []).append((sigma, mech["sample_rate"], steps))
        # A refused round trains nothing and sends nothing.
        refused = e.get("status") == "refused-budget"
        if accountable and refused and (steps != 0 or e.get("update_hash") is not None):
            report.findings.append(
                Finding(
                    OVER_BUDGET,
                    f"{where}: refused for budget but records {steps!r} steps "
                    f"and {'an' if e.get('update_hash') else 'no'} update",
                )
            )
        if accountable and e.get("status") == "discarded" and e.get("update_hash") is not None:
            report.findings.append(
                Finding(ACCOUNTING, f"{where}: recorded as discarded (nothing sent) but records an update hash")
            )
        if not accountable:
            report.recomputed.append(None)
            continue
        if e.get("private") is not True:  # non-private: epsilon is infinite once it trained
            report.recomputed.append(math.inf if any(s <= 0 for s, _, _ in history) else None)
            continue
        v2 = e.get("version", 1) >= 2
        legacy = not v2 and e["accountant"] == "rdp"
        delta, accountant = e["delta"], e["accountant"]
        recomputed = epsilon_from_history(history, delta=delta, accountant=accountant, legacy=legacy)
        report.recomputed.append(recomputed)
        _check_epsilon(
            report,
            where,
            "ε",
            _number(e["epsilon"]),
            recomputed,
            history,
            delta=delta,
            accountant=accountant,
            legacy=legacy,
            tolerance=tolerance,
        )
        trained = e.get("status") in ("trained", "discarded")
        _check_budget(
            report,
            where,
            "ε",
            _number(e["epsilon"]),
            recomputed,
            _number(e["budget"]),
            trained=trained,
            legacy=legacy,
            tolerance=tolerance,
            what="the site's lifetime budget",
        )
        if v2:  # this run's own mechanisms against the run's allowance
            own = runs.get(e.get("run_id"), [])
            run_recomputed = epsilon_from_history(own, delta=delta, accountant=accountant)
            report.run_recomputed[i] = run_recomputed
            _check_epsilon(
                report,
                where,
                "run ε",
                _number(e["run_epsilon"]),
                run_recomputed,
                own,
                delta=delta,
                accountant=accountant,
                legacy=False,
                tolerance=tolerance,
            )
            _check_budget(
                report,
                where,
                "run ε",
                _number(e["run_epsilon"]),
                run_recomputed,
                _number(e["run_budget"]),
                trained=trained,
                legacy=False,
                tolerance=tolerance,
                what="the run's allowance",
            )


def _check_epsilon(
    report: ClientReport,
    where: str,
    name: str,
    recorded: float,
    recomputed: float,
    history: list[tuple[float, float, int]],
    *,
    delta: float,
    accountant: str,
    legacy: bool,
    tolerance: float,
) -> None:
    """Recorded against recomputed epsilon: an under-report only within the independent accountant's error."""
    with_ = RECOMPUTED_WITH[accountant]
    if math.isinf(recomputed):
        if math.isfinite(recorded):
            report.findings.append(
                Finding(
                    ACCOUNTING,
                    f"{where}: records {name} = {recorded:.4g}, but an earlier round trained without noise: {name} is infinite",
                )
            )
        return
    if math.isinf(recorded):
        report.findings.append(
            Finding(ACCOUNTING, f"{where}: records {name} = ∞, but its mechanisms give {name} = {recomputed:.4f} with {with_}")
        )
        return
    if legacy:  # format-1 "rdp": symmetric, as format 1 was audited
        if abs(recorded - recomputed) > allowance(recomputed, tolerance):
            report.findings.append(
                Finding(
                    ACCOUNTING,
                    f"{where}: records {name} = {recorded:.4f}, recomputed "
                    f"{recomputed:.4f} with {with_} (format 1, symmetric "
                    f"tolerance {allowance(recomputed, tolerance):.4f})",
                )
            )
        return
    if recorded < recomputed:
        if accountant == "prv":  # the first pass may be up to 0.03 high: compare with the fine interval
            recomputed = epsilon_from_history(history, delta=delta, accountant=accountant, fine=True)
            slack = UNDER_REPORT_SLACK
        else:
            slack = BUDGET_SLACK * max(1.0, recomputed)
        if recorded < recomputed - slack:
            report.findings.append(
                Finding(
                    ACCOUNTING,
                    f"{where}: records {name} = {recorded:.4f}, below "
                    f"{name} = {recomputed:.4f} recomputed with {with_} (spend "
                    f"under-reported by {recomputed - recorded:.4f} > "
                    f"{slack:.4g}, the independent accountant's own error)",
                )
            )
    elif recorded - recomputed > allowance(recomputed, tolerance):
        report.findings.append(
            Finding(
                ACCOUNTING,
                f"{where}: records {name} = {recorded:.4f}, above "
                f"{name} = {recomputed:.4f} recomputed with {with_} (by "
                f"{recorded - recomputed:.4f} > {allowance(recomputed, tolerance):.4f}: "
                "the recorded mechanisms do not explain the recorded value)",
            )
        )


def _check_budget(
    report: ClientReport,
    where: str,
    name: str,
    recorded: float,
    recomputed: float,
    budget: float,
    *,
    trained: bool,
    legacy: bool,
    tolerance: float,
    what: str,
) -> None:
    """No slack: neither the recorded nor the recomputed epsilon of a round that trained may exceed its budget."""
    if math.isinf(budget):
        return
    if math.isinf(recomputed) or math.isinf(recorded):
        if trained:
            report.findings.append(
                Finding(
                    OVER_BUDGET,
                    f"{where}: trained under its budget ε = {budget:g} ({what}) "
                    f"although {name} is infinite (an earlier round trained "
                    "without noise)",
                )
            )
        return
    if recorded > budget + BUDGET_SLACK:
        report.findings.append(
            Finding(OVER_BUDGET, f"{where}: records {name} = {recorded:.4f}, over its budget ε = {budget:g} ({what})")
        )
    elif recomputed > budget + (allowance(recomputed, tolerance) if legacy else BUDGET_SLACK):
        report.findings.append(
            Finding(OVER_BUDGET, f"{where}: recomputed {name} = {recomputed:.4f} is over its budget ε = {budget:g} ({what})")
        )


def audit_path(path: str | Path, *, tolerance: float = DEFAULT_TOLERANCE, keys: str | Path | None = None) -> AuditReport:
    """Audit every ledger under ``path`` (run folder, folder of ledgers, or one ledger file).

    ``keys``: a folder of pinned public keys, ``<client_id>.pem`` (``fedfuse certs`` writes
    ``superlink/ledger-keys/``); a ledger signed by another key, of a client without a key there, or
    (auditing a run) a client with a key there but no ledger, is reported as tampering. A client that
    results.json says spent privacy but that has no ledger is reported as tampering too.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise LedgerError(f"tolerance must be a number >= 0, got {tolerance}")
    if keys is not None and not Path(keys).is_dir():
        raise LedgerError(f"--keys {keys} is not a folder: give the folder of <client_id>.pem ledger public keys")
    path = Path(path)
    found = find_ledgers(path)
    # Every client the run or the auditor knows of must have a ledger: deleting both copies must not hide one.
    expected = roster(path) if path.is_dir() else {}
    single = path.is_file() or (path / LEDGER_FILE).is_file()  # one client's ledger: the other keys are not about it
    if keys is not None and not single:
        expected |= {p.stem: f"its ledger key is pinned ({p})" for p in sorted(Path(keys).glob("*.pem"))}
    if not found and not expected:
        raise LedgerError(
            f"no ledgers under {path}: expected {path}/ledgers/*.jsonl (federation copies), "
            f"{path}/clients/*/{LEDGER_FILE} (client copies), {path}/{LEDGER_FILE} (a site's state folder) or "
            "*.jsonl ledger files"
        )
    clients = {}
    for cid, why in expected.items():
        if cid not in found:
            report = ClientReport(client_id=cid, sources={})
            report.findings.append(Finding(TAMPERING, f"no ledger at all, though {why}: every copy of it is missing (deleted?)"))
            clients[cid] = report
    for cid, sources in sorted(found.items()):
        pinned = None
        if keys is not None:
            key_file = Path(keys) / f"{cid}.pem"
            if not key_file.is_file():
                report = ClientReport(client_id=cid, sources=dict(sources))
                report.findings.append(Finding(TAMPERING, f"no pinned ledger key {key_file}: unknown client"))
                clients[cid] = report
                continue
            pinned = load_public_key_hex(key_file)
        clients[cid] = audit_client(cid, sources, tolerance=tolerance, expected_public_key=pinned)
    return AuditReport(path=path, tolerance=tolerance, clients=dict(sorted(clients.items())))


# --- presenting ---------------------------------------------------------------------------------


def format_report(report: AuditReport) -> str:
    """The audit as a text table, then every problem, then the tolerance rule."""
    header = ["client", "modalities", "rounds", "privacy spend", "recomputed ε", "budget ε", "status"]
    rows = [header]
    for cid, c in report.clients.items():
        last = c.last
        rec = c.recomputed[-1] if c.recomputed else None
        budget = last.get("budget")
        rows.append(
            [
                cid,
                ",".join(c.modalities) or "-",
                f"{c.rounds}"
                + (f" (+{c.refused_rounds} refused)" if c.refused_rounds else "")
                + (f" (+{c.discarded_rounds} discarded)" if c.discarded_rounds else ""),
                "-" if not c.entries else format_spend(last.get("epsilon") if c.private else None, last.get("delta")),
                "-" if rec is None else ("∞" if math.isinf(rec) else f"{rec:.2f}"),
                "∞" if not c.private else (f"{budget:g}" if isinstance(budget, (int, float)) else "-"),
                c.status.upper() if c.findings else c.status,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for cid, c in report.clients.items():
        if c.findings:
            lines.append("")
            lines.append(f"{cid}: {len(c.findings)} problem(s)")
            lines += [f"  [{f.kind}] {f.message}" for f in c.findings]
    lines += ["", f"tolerance: {report.tolerance_text()}"]
    lines.append("result: " + ("all ledgers verify and agree" if report.ok else f"FAILED (exit status {report.exit_status})"))
    return "\n".join(lines)


def report_json(report: AuditReport) -> str:
    """The audit as JSON (strict: no NaN or infinity)."""
    return json.dumps(report.to_json(), indent=2, ensure_ascii=False, allow_nan=False)


def plot_report(report: AuditReport, path: str | Path) -> None:
    """PNG of recorded (solid) and recomputed (dashed) epsilon per ledger entry, budget dotted."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for n, (cid, c) in enumerate(report.clients.items()):
        color = f"C{n % 10}"
        xs = [i + 1 for i, e in enumerate(c.entries) if e.get("private") is True]
        if not xs:
            continue
        ax.plot(xs, [c.entries[x - 1].get("epsilon") for x in xs], "-o", color=color, ms=3, label=f"{cid} recorded")
        rec = [c.recomputed[x - 1] for x in xs]
        ax.plot(
            xs,
            [r if r is not None and math.isfinite(r) else float("nan") for r in rec],
            "--",
            color=color,
            label=f"{cid} recomputed",
        )
        budget = c.entries[xs[-1] - 1].get("budget")
        if isinstance(budget, (int, float)):
            ax.axhline(budget, color=color, ls=":", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ledger entry (rounds the client trained or refused)")
    ax.set_ylabel("cumulative ε")
    ax.set_title(f"privacy spend per client ({report.path.name}); dotted: budget")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
