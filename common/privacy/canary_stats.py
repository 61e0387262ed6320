"""Epsilon lower bound from one training run with canaries (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries are each included in training independently with probability 1/2. After training the
auditor scores every canary and guesses "in" for the k+ highest scores and "out" for the k-
lowest (abstaining on the rest). With v correct out of r = k+ + k- guesses, the run is
inconsistent with (eps, delta)-DP at confidence 1 - beta when

    P[Bin(r, q) >= v] + 2 m delta * max_{1<=i<=v} (1/i) P[v-i <= Bin(r, q) < v]  <  beta,
    q = e^eps / (1 + e^eps)

(their Theorem 3.1 with Proposition 5.7). The lower bound is the largest such eps. The p-value and
the root search follow the public reference, jax_privacy ``auditing.py`` (``_one_run_p_value``,
``_epsilon_one_run``); tests/test_canary_stats.py pins values computed with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.stats import binom

from common.errors import PrivacyParameterError

EPS_TOL = 1e-7  # bisection stops when the bracket is this narrow
EPS_MAX = 1e3  # no bound is searched above this
DEFAULT_KS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def p_value(*, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """Probability of >= num_correct correct guesses of num_guesses under (epsilon, delta)-DP (upper bound)."""
    m, r, v = num_canaries, num_guesses, num_correct
    q = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    window = binom.sf(v - i - 1, r, q) - tail  # P[v - i <= Bin(r, q) < v], for i = 1..v
    alpha = max(float(np.max(window / i)), 0.0)
    return min(tail + 2 * m * delta * alpha, 1.0)


def _check(num_canaries: int, num_guesses: int, num_correct: int, delta: float, beta: float) -> None:
    if not (isinstance(num_canaries, (int, np.integer)) and num_canaries >= 1):
        raise PrivacyParameterError(f"num_canaries must be a positive integer, got {num_canaries!r}")
    if not 0 <= num_guesses <= num_canaries:
        raise PrivacyParameterError(f"num_guesses must lie in [0, num_canaries={num_canaries}], got {num_guesses}")
    if not 0 <= num_correct <= num_guesses:
        raise PrivacyParameterError(f"num_correct must lie in [0, num_guesses={num_guesses}], got {num_correct}")
    if not 0 <= delta < 1:
        raise PrivacyParameterError(f"delta must lie in [0, 1), got {delta}")
    if not 0 < beta < 1:
        raise PrivacyParameterError(f"beta (1 - confidence) must lie in (0, 1), got {beta}")


def epsilon_lower_bound(*, num_canaries: int, num_guesses: int, num_correct: int, delta: float, beta: float = 0.05) -> float:
    """Largest epsilon that v = num_correct of r = num_guesses correct guesses refute at confidence 1 - beta.

    0.0 when the guesses refute no epsilon (e.g. they are no better than chance).
    """
    _check(num_canaries, num_guesses, num_correct, delta, beta)

    def refuted(eps: float) -> bool:
        pv = p_value(num_canaries=num_canaries, num_guesses=num_guesses, num_correct=num_correct, epsilon=eps, delta=delta)
        return pv < beta

    if num_correct == 0 or not refuted(0.0):
        return 0.0
    # Bracket: refuted at lo, not refuted at hi (doubling, as the reference does), then bisect.
    lo, hi = 0.0, 1.0
    while refuted(hi):
        lo, hi = hi, 2 * hi
        if hi > EPS_MAX:
            return EPS_MAX
    while hi - lo > EPS_TOL:
        mid = 0.5 * (lo + hi)
        if refuted(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _guesses(order: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> tuple[int, int]:
    """(r, v) for guessing "in" on the k_plus highest scores and "out" on the k_minus lowest."""
    top = order[:k_plus]
    bottom = order[len(order) - k_minus :] if k_minus else order[:0]
    correct = int(included[top].sum()) + int((~included[bottom]).sum())
    return k_plus + k_minus, correct


def audit_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    beta: float = 0.05,
    ks: Sequence[int | tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Best epsilon lower bound over several guess sizes, Bonferroni-corrected (beta / len(ks)).

    ``scores``: one per canary, higher = more likely included (the rule must not look at
    ``included``). ``included``: whether each canary was in the training data. ``ks``: top-k sizes
    (int, guess "in" only) or (k_plus, k_minus) pairs; by default 10, 20, 50, ... up to m.
    Ties in scores are broken by canary position, which is independent of inclusion.
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included)
    m = scores.shape[0] if scores.ndim == 1 else 0
    if m == 0 or included.shape != scores.shape:
        raise PrivacyParameterError(
            f"scores and included must be two 1-D sequences of the same non-zero length, got shapes "
            f"{scores.shape} and {included.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise PrivacyParameterError("scores must be finite numbers (replace NaN/inf before auditing)")
    if included.dtype != bool:
        if not np.all(np.isin(included, (0, 1))):
            raise PrivacyParameterError("included must hold booleans (or 0/1)")
        included = included.astype(bool)
    if not 0 < beta < 1:
        raise PrivacyParameterError(f"beta (1 - confidence) must lie in (0, 1), got {beta}")
    if ks is None:
        ks = [k for k in DEFAULT_KS if k <= m] or [m]
    pairs = [(int(k), 0) if isinstance(k, (int, np.integer)) else (int(k[0]), int(k[1])) for k in ks]
    for k_plus, k_minus in pairs:
        if k_plus < 0 or k_minus < 0 or k_plus + k_minus == 0 or k_plus + k_minus > m:
            raise PrivacyParameterError(
                f"guess sizes (k+={k_plus}, k-={k_minus}) must be >= 0, not both 0, and sum to at most the {m} canaries"
            )
    beta_each = beta / len(pairs)
    order = np.argsort(-scores, kind="stable")  # highest score first
    tried = []
    for k_plus, k_minus in pairs:
        r, v = _guesses(order, included, k_plus, k_minus)
        eps = epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta, beta=beta_each)
        tried.append({"k_plus": k_plus, "k_minus": k_minus, "num_guesses": r, "num_correct": v, "epsilon_lb": eps})
    best = max(tried, key=lambda t: (t["epsilon_lb"], -t["num_guesses"]))
    return {
        "epsilon_lb": best["epsilon_lb"],
        "k_plus": best["k_plus"],
        "k_minus": best["k_minus"],
        "num_guesses": best["num_guesses"],
        "num_correct": best["num_correct"],
        "num_canaries": m,
        "num_included": int(included.sum()),
        "delta": delta,
        "beta": beta,
        "beta_per_guess_size": beta_each,
        "tried": tried,
    }
