"""One-run audit statistics: pinned against the public reference, sanity of the bound."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import PrivacyParameterError
from common.privacy.canary_stats import audit_scores, epsilon_lower_bound, p_value

# Values computed with jax_privacy/auditing.py (google-deepmind/jax_privacy, commit 03a095e9):
# _epsilon_one_run(0, m, r, v, beta, delta) and _one_run_p_value(m, r, v, eps, delta), run with
# scipy 1.17.1 (the functions need only numpy/scipy). The reference solves with brentq(xtol=1e-6).
REFERENCE_EPSILON = [
    # (m, r, v, delta, beta, eps_lb)
    (1000, 100, 100, 1e-5, 0.05, 3.465376229385333),
    (1000, 100, 90, 1e-5, 0.05, 1.6261436787042223),
    (1000, 100, 87, 1e-5, 0.05, 1.3903477130653183),
    (1000, 100, 87, 1e-5, 0.025, 1.3064443519526092),
    (1000, 100, 80, 1e-5, 0.05, 0.9553185001776855),
    (1000, 100, 60, 1e-5, 0.05, 0.04954866357098898),
    (1000, 100, 58, 1e-5, 0.05, 0.0),
    (1000, 100, 50, 1e-5, 0.05, 0.0),
    (1000, 1000, 700, 1e-5, 0.05, 0.7317406384658977),
    (1000, 500, 400, 1e-5, 0.05, 1.1979685996776859),
    (10000, 1000, 1000, 1e-5, 0.05, 5.5293496028337605),
    (10000, 5000, 3000, 1e-5, 0.05, 0.3571260257163746),
    (100, 20, 20, 1e-3, 0.05, 1.476281709043727),
    (1000, 200, 180, 0.0, 0.05, 1.7988652649826387),
    (1000, 50, 48, 1e-5, 0.01, 1.6388879729083672),
]
REFERENCE_P_VALUE = [
    # (m, r, v, eps, delta, p)
    (1000, 100, 80, 1.0, 1e-5, 0.07300911594917776),
    (1000, 100, 80, 1.0, 0.0, 0.07155624680483674),
    (1000, 500, 300, 0.3, 1e-5, 0.13386858992450232),
    (100, 20, 18, 2.0, 1e-3, 0.6122399810710308),
    (1000, 1000, 700, 0.5, 1e-5, 0.0001867555867980428),
]


@pytest.mark.parametrize("m,r,v,delta,beta,expected", REFERENCE_EPSILON)
def test_epsilon_lower_bound_matches_reference(m, r, v, delta, beta, expected):
    # Execute
    eps = epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta, beta=beta)
    # Assert
    assert eps == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("m,r,v,eps,delta,expected", REFERENCE_P_VALUE)
def test_p_value_matches_reference(m, r, v, eps, delta, expected):
    assert p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta) == pytest.approx(expected, rel=1e-12)


def test_more_correct_guesses_give_a_higher_bound():
    # Execute
    bounds = [epsilon_lower_bound(num_canaries=1000, num_guesses=100, num_correct=v, delta=1e-5) for v in range(50, 101)]
    # Assert
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    positive = [b for b in bounds if b > 0]
    assert all(b2 > b1 for b1, b2 in zip(positive, positive[1:]))
    assert bounds[-1] == pytest.approx(3.465376229385333, abs=1e-6)


def test_guesses_at_chance_give_zero():
    # Prepare: half of the guesses right, and scores that carry no information
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = rng.normal(size=1000)
    # Execute
    at_half = epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=100, delta=1e-5)
    result = audit_scores(scores, included, delta=1e-5)
    # Assert
    assert at_half == 0.0
    assert result["epsilon_lb"] == 0.0
    assert epsilon_lower_bound(num_canaries=10, num_guesses=0, num_correct=0, delta=1e-5) == 0.0


def _planted(m: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Scores ranked by position (canary 0 highest); 87 of the top 100 included, half of the rest."""
    idx = np.arange(m)
    included = np.where(idx < 100, idx % 8 != 0, idx % 2 == 0)
    return -idx.astype(float), included


def test_audit_scores_counts_and_matches_reference_at_one_threshold():
    # Prepare: the reference's CanaryScoreAuditor.epsilon_one_run with Explicit(threshold at the 100th
    # score) sees tp = 87, fp = 13, i.e. _epsilon_one_run(0, 1000, 100, 87, 0.05, 1e-5)
    scores, included = _planted()
    # Execute
    result = audit_scores(scores, included, delta=1e-5, ks=[100])
    # Assert
    assert (result["num_guesses"], result["num_correct"], result["num_canaries"]) == (100, 87, 1000)
    assert result["epsilon_lb"] == pytest.approx(1.3903477130653183, abs=1e-6)


def test_audit_scores_bonferroni_over_guess_sizes():
    # Prepare
    scores, included = _planted()
    # Execute
    result = audit_scores(scores, included, delta=1e-5, ks=[50, 100])
    # Assert: each size is tested at beta / 2; the best one is reported with its counts
    assert result["beta_per_guess_size"] == 0.025
    assert [(t["num_guesses"], t["num_correct"]) for t in result["tried"]] == [(50, 43), (100, 87)]
    assert result["k_plus"] == 100
    assert result["epsilon_lb"] == pytest.approx(1.3064443519526092, abs=1e-6)


def test_audit_scores_two_sided_guesses():
    # Prepare: bottom 100 positions (900..999) hold 50 included canaries
    scores, included = _planted()
    # Execute
    result = audit_scores(scores, included, delta=1e-5, ks=[(100, 100)])
    # Assert: 87 right "in" guesses + 50 right "out" guesses
    assert (result["num_guesses"], result["num_correct"]) == (200, 137)
    assert result["epsilon_lb"] == pytest.approx(
        epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=137, delta=1e-5), abs=1e-12
    )


def test_strong_signal_gives_positive_bound_with_default_sizes():
    # Prepare: included canaries score clearly higher
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    scores = rng.normal(size=1000) + 3.0 * included
    # Execute
    result = audit_scores(scores, included, delta=1e-5)
    # Assert
    assert [t["k_plus"] for t in result["tried"]] == [10, 20, 50, 100, 200, 500, 1000]
    assert result["epsilon_lb"] > 1.5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_canaries=0, num_guesses=0, num_correct=0, delta=1e-5),
        dict(num_canaries=10, num_guesses=11, num_correct=1, delta=1e-5),
        dict(num_canaries=10, num_guesses=5, num_correct=6, delta=1e-5),
        dict(num_canaries=10, num_guesses=5, num_correct=3, delta=1.0),
        dict(num_canaries=10, num_guesses=5, num_correct=3, delta=1e-5, beta=0.0),
    ],
)
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(PrivacyParameterError):
        epsilon_lower_bound(**kwargs)


def test_audit_scores_rejects_bad_inputs():
    with pytest.raises(PrivacyParameterError):
        audit_scores([1.0, 2.0], [True], delta=1e-5)
    with pytest.raises(PrivacyParameterError):
        audit_scores([1.0, float("nan")], [True, False], delta=1e-5)
    with pytest.raises(PrivacyParameterError):
        audit_scores([1.0, 2.0], [True, False], delta=1e-5, ks=[3])
