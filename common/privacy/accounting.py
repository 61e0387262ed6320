"""Privacy accounting for one client across all its rounds: history, epsilon, noise calibration, budget.

A client's whole participation is a sequence of Poisson-subsampled Gaussian mechanisms
``[(noise_multiplier, sample_rate, steps), ...]`` (one entry per round it trained). Epsilon is
always computed over the *whole* history with Opacus's PRV (default) or RDP accountant; a new
accountant per round would report one round's epsilon only (README, "The privacy guarantee").
A round trained without DP is recorded with noise multiplier 0: from then on the client's epsilon
is infinite, whatever it trains afterwards.

Two budgets apply to every private round (README, "The privacy guarantee"):

- the **run's allowance** ``dp.epsilon``: the epsilon of this run's own mechanisms alone, composed
  over the run, stays within it;
- the **site's lifetime cap** ``max-epsilon``: the epsilon of the client's whole history, every run
  included, stays within it.

The noise is calibrated so that the run's planned participation satisfies both.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as _opacus_rdp

from common.config import ACCOUNTANTS
from common.errors import BudgetExhaustedError, NonPrivateHistoryError, PrivacyParameterError

# Opacus recomputes the RDP of one subsampled Gaussian step for ~150 orders on every call (PRV uses
# it too, to size its domain): 0.7 s of a 0.8 s epsilon. It is a pure function of (q, sigma, order),
# so memoising it changes no value and makes every later epsilon of the same mechanism ~10x faster.
if not hasattr(_opacus_rdp._compute_rdp, "cache_info"):
    _opacus_rdp._compute_rdp = functools.lru_cache(maxsize=65536)(_opacus_rdp._compute_rdp)
HISTORY_FORMAT = 1
# RDP is converted to epsilon over integer orders only: Opacus and the audit's dp-accounting agree on them
# exactly, while dp-accounting evaluates fractional orders only approximately (docs/ledger-format.md).
RDP_ORDERS = tuple(float(a) for a in range(2, 257))
Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def validate_privacy_parameters(*, target_epsilon: float, delta: float, max_grad_norm: float | None = None) -> None:
    """Raise PrivacyParameterError naming the first invalid parameter."""
    if not isinstance(target_epsilon, (int, float)) or math.isnan(target_epsilon) or target_epsilon <= 0:
        raise PrivacyParameterError(f"epsilon must be > 0 (use inf for non-private training), got {target_epsilon}")
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PrivacyParameterError(f"delta must lie in (0, 1), got {delta}")
    if max_grad_norm is not None and (not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
        raise PrivacyParameterError(f"max grad norm must be a positive number, got {max_grad_norm}")


def merge_history(history: list[Mechanism]) -> list[Mechanism]:
    """Merge consecutive entries with the same (sigma, q): the same mechanism, composed once."""
    merged: list[Mechanism] = []
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((float(sigma), float(q), int(steps)))
    return merged


def compute_epsilon(history: list[Mechanism], *, delta: float, accountant: str = "prv") -> float:
    """Epsilon of the composition of ``history`` at ``delta`` (0 for an empty history, inf when an entry
    has no noise)."""
    if accountant not in ACCOUNTANTS:
        raise PrivacyParameterError(f"accountant must be one of {list(ACCOUNTANTS)}, got '{accountant}'")
    merged = merge_history(history)
    if not merged:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in merged):
        return math.inf
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = list(merged)
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        # RDP warns when the optimal order is at the end of its alpha grid (the value is still an upper
        # bound); PRV takes log(1 - q), which is -inf (and handled) when every record is in every batch.
        warnings.simplefilter("ignore", UserWarning)
        if accountant == "rdp":
            return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    *,
    history: list[Mechanism],
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "prv",
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to within ``tolerance`` in epsilon) such that ``history`` followed by
    ``steps`` more steps at ``sample_rate`` stays within ``target_epsilon``.

    Raises BudgetExhaustedError when even very large noise cannot fit (the history has spent it).
    """
    validate_privacy_parameters(target_epsilon=target_epsilon, delta=delta)

    def eps(sigma: float) -> float:
        return compute_epsilon(history + [(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    def exhausted(spent: float) -> BudgetExhaustedError:
        return BudgetExhaustedError(
            f"no noise level fits {steps} more steps into the budget ε = {target_epsilon:g}: ε = {spent:.4g} is already spent",
            epsilon_now=spent,
            epsilon_after=math.inf,
            budget=target_epsilon,
        )

    # Everything is decided with the history's own accountant: a bound from another accountant (RDP is looser
    # than PRV) would refuse a client that still has budget, and record that other accountant's epsilon.
    spent = compute_epsilon(history, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise exhausted(spent)
    # Bracket [lo, hi] with eps(lo) > target >= eps(hi). RDP is a looser bound than PRV, so its (fast)
    # calibration usually gives PRV's upper end; when RDP finds no fit, PRV brackets on its own.
    hi = 1.0
    if accountant == "prv":
        try:
            hi = calibrate_noise(
                history=history,
                sample_rate=sample_rate,
                steps=steps,
                target_epsilon=target_epsilon,
                delta=delta,
                accountant="rdp",
                tolerance=tolerance,
            )
        except BudgetExhaustedError:
            hi = 1.0
    e_hi = eps(hi)
    while e_hi > target_epsilon:
        hi *= 2
        if hi > 1e4:
            raise exhausted(spent)
        e_hi = eps(hi)
    lo = 0.8 * hi
    e_lo = eps(lo)
    while e_lo <= target_epsilon and lo > 1e-3:
        hi, e_hi, lo = lo, e_lo, 0.8 * lo
        e_lo = eps(lo)
    if e_lo <= target_epsilon:
        return lo
    # Illinois regula falsi on log(eps) - log(target), which is close to linear in sigma.
    f_lo, f_hi = math.log(e_lo / target_epsilon), math.log(max(e_hi, 1e-300) / target_epsilon)
    last = 0
    while target_epsilon - e_hi > tolerance * target_epsilon and hi - lo > 1e-6 * hi:
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        mid = min(max(mid, lo + 0.01 * (hi - lo)), hi - 0.01 * (hi - lo))
        e_mid = eps(mid)
        f_mid = math.log(max(e_mid, 1e-300) / target_epsilon)
        if e_mid > target_epsilon:
            lo, f_lo = mid, f_mid
            if last == -1:
                f_hi /= 2
            last = -1
        else:
            hi, e_hi, f_hi = mid, e_mid, f_mid
            if last == 1:
                f_lo /= 2
            last = 1
    return hi


def calibrate_run(
    *,
    history: list[Mechanism],
    sample_rate: float,
    steps: int,
    run_budget: float,
    lifetime_budget: float,
    delta: float,
    accountant: str = "prv",
    run_history: list[Mechanism] | None = None,
) -> float:
    """Noise multiplier for a run of ``steps`` steps at ``sample_rate`` that keeps both budgets.

    The run's own mechanisms (``run_history``, the run's earlier entries: none for a new run, followed by the
    run) must stay within ``run_budget`` (``dp.epsilon``), and ``history`` (every entry, of every run and of
    older versions) followed by the run within ``lifetime_budget`` (the site's ``max-epsilon``; inf for no
    cap): the larger of the two calibrated noise multipliers satisfies both. Raises BudgetExhaustedError when
    a budget is spent.
    """
    sigma = calibrate_noise(
        history=list(run_history or []),
        sample_rate=sample_rate,
        steps=steps,
        target_epsilon=run_budget,
        delta=delta,
        accountant=accountant,
    )
    if math.isinf(lifetime_budget) or (not merge_history(history) and lifetime_budget >= run_budget):
        return sigma  # a fresh client under a cap no tighter than the run's: the run's budget decides alone
    if compute_epsilon(history + [(sigma, sample_rate, steps)], delta=delta, accountant=accountant) <= lifetime_budget:
        return sigma  # the run's noise keeps the lifetime cap too: one evaluation instead of a calibration
    lifetime = calibrate_noise(
        history=history, sample_rate=sample_rate, steps=steps, target_epsilon=lifetime_budget, delta=delta, accountant=accountant
    )
    return max(sigma, lifetime)


@dataclass(frozen=True)
class NoisePlan:
    """The noise calibrated once for a client's planned participation in one run."""

    run_id: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float  # the run's allowance (dp.epsilon)
    delta: float
    max_grad_norm: float

    def matches(self, **params: Any) -> bool:
        return all(getattr(self, k) == v for k, v in params.items())


@dataclass
class PrivacyHistory:
    """One client's accountant history across every round of every run. JSON-serialisable."""

    accountant: str = "prv"
    delta: float | None = None  # fixed by the first round; every later round must use the same
    entries: list[Mechanism] = field(default_factory=list)
    plan: NoisePlan | None = None
    runs: list[str] = field(default_factory=list)  # the run of each entry ("" for entries of older versions)
    # An entry of an older version ("") names no run: it counts towards the lifetime cap only (it was spent in a
    # run that is over), never towards a run's allowance, in calibration, the budget check and the run's epsilon.

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyParameterError(f"accountant must be one of {list(ACCOUNTANTS)}, got '{self.accountant}'")
        if len(self.runs) > len(self.entries):
            raise PrivacyParameterError("a privacy history names more runs than it has entries")
        self.runs = list(self.runs) + [""] * (len(self.entries) - len(self.runs))

    @property
    def non_private(self) -> bool:
        """True once a round trained without noise: the client's epsilon is infinite for good."""
        return any(sigma <= 0 and steps > 0 for sigma, _, steps in self.entries)

    def epsilon(self, *, extra: list[Mechanism] | None = None) -> float:
        """Lifetime epsilon: the whole history (plus ``extra`` mechanisms, not recorded); inf when non-private."""
        return self._epsilon(self.entries + (extra or []))

    def run_epsilon(self, run_id: str | None = None, *, extra: list[Mechanism] | None = None) -> float:
        """Epsilon of one run alone (default: the plan's): its own mechanisms (plus ``extra``), composed."""
        run_id = run_id if run_id is not None else (self.plan.run_id if self.plan is not None else None)
        return self._epsilon(self.run_entries(run_id) + (extra or []))

    def run_entries(self, run_id: str | None) -> list[Mechanism]:
        """The entries of run ``run_id``; entries of older versions (run "") belong to no run."""
        return [m for m, r in zip(self.entries, self.runs) if run_id and r == run_id]

    def _epsilon(self, mechanisms: list[Mechanism]) -> float:
        if not merge_history(mechanisms):
            return 0.0
        if any(sigma <= 0 for sigma, _, steps in mechanisms if steps > 0):
            return math.inf
        assert self.delta is not None, "a private history with entries has a delta"
        return compute_epsilon(mechanisms, delta=self.delta, accountant=self.accountant)

    def refuse_if_non_private(self, *, budget: float) -> None:
        """Fail closed: a private request on a history that trained without noise is refused (NonPrivateHistoryError)."""
        if self.non_private:
            raise NonPrivateHistoryError(
                "this client already trained without differential privacy (a round with dp.epsilon = inf): its "
                f"epsilon is infinite for good, so no private run can be honoured (asked for ε = {budget:g}); "
                "nothing was trained. Use a new state folder (fresh encoders, new ledger) for private training",
                budget=budget,
            )

    def check_budgets(self, mechanism: Mechanism, *, budget: float, run_budget: float) -> tuple[float, float]:
        """Fail closed: (lifetime epsilon, run epsilon) after ``mechanism``, or BudgetExhaustedError if the
        lifetime epsilon would exceed ``budget`` (the site's cap) or the run's own epsilon ``run_budget``. The error
        carries the lifetime epsilon now (what the ledger records) and the exceeded budget with the epsilon it
        would reach."""
        self.refuse_if_non_private(budget=run_budget if math.isfinite(run_budget) else budget)
        after, run_after = self.epsilon(extra=[mechanism]), self.run_epsilon(extra=[mechanism])
        for what, value, limit, now in (
            ("in total", after, budget, self.epsilon),
            ("in this run", run_after, run_budget, self.run_epsilon),
        ):
            if value > limit:
                spent = now()
                raise BudgetExhaustedError(
                    f"training this round would spend (ε = {value:.4g}, δ = {self.delta:g}) {what}, over the budget "
                    f"ε = {limit:g} ({'the lifetime cap' if what == 'in total' else 'the run allowance dp.epsilon'}; "
                    f"spent so far {what}: ε = {spent:.4g}); nothing was trained",
                    epsilon_now=self.epsilon(),
                    epsilon_after=value,
                    budget=limit,
                )
        return after, run_after

    def record(self, mechanism: Mechanism, *, run_id: str = "") -> None:
        """Append one round's mechanism (of run ``run_id``); noise multiplier 0 records a round trained without DP."""
        sigma, q, steps = mechanism
        if not (sigma >= 0 and 0 < q <= 1 and isinstance(steps, int) and steps >= 0):
            raise PrivacyParameterError(f"invalid mechanism {mechanism}")
        self.entries.append((float(sigma), float(q), int(steps)))
        self.runs.append(str(run_id))

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": HISTORY_FORMAT,
            "accountant": self.accountant,
            "delta": self.delta,
            "history": [list(e) for e in self.entries],
            "runs": list(self.runs),
            "plan": None if self.plan is None else self.plan.__dict__.copy(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyHistory:
        """Load and validate; a malformed history raises PrivacyParameterError (never trains on it)."""
        try:
            if data.get("format") != HISTORY_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            entries = []
            for e in data["history"]:
                sigma, q, steps = e
                if not (float(sigma) >= 0 and 0 < float(q) <= 1 and int(steps) == steps and steps >= 0):
                    raise ValueError(f"invalid entry {e}")
                entries.append((float(sigma), float(q), int(steps)))
            plan = NoisePlan(**data["plan"]) if data.get("plan") else None
            delta = data.get("delta")
            if any(sigma > 0 and steps > 0 for sigma, _, steps in entries) and delta is None:
                raise ValueError("private entries without delta")
            runs = data.get("runs", [])
            if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
                raise ValueError(f"runs must be a list of run ids, got {runs!r}")
            return cls(accountant=data["accountant"], delta=delta, entries=entries, plan=plan, runs=runs)
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyParameterError(f"malformed privacy history: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> PrivacyHistory:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrivacyParameterError(f"malformed privacy history (not JSON): {exc}") from exc
        if not isinstance(data, dict):
            raise PrivacyParameterError("malformed privacy history: expected a JSON object")
        return cls.from_dict(data)
