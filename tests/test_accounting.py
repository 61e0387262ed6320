"""Accounting: reference epsilons, composition across rounds, calibration, budget, serialisation."""

import math

import pytest

from common.errors import BudgetExhaustedError, PrivacyParameterError
from common.privacy.accounting import (
    NoisePlan,
    PrivacyHistory,
    calibrate_noise,
    compute_epsilon,
    merge_history,
    validate_privacy_parameters,
)
from common.privacy.spend import format_spend


def test_reference_epsilon_rdp():
    # Integer orders 2-256 only (Opacus's fractional orders give 1.7118; the audit's dp-accounting evaluates
    # those only approximately, so both sides use integer orders and agree exactly)
    assert compute_epsilon([(1.1, 0.01, 1000)], delta=1e-5, accountant="rdp") == pytest.approx(1.7253, abs=1e-4)


def test_reference_epsilon_prv():
    assert compute_epsilon([(1.1, 0.01, 1000)], delta=1e-5, accountant="prv") == pytest.approx(1.5255, abs=1e-3)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_history_over_rounds_equals_one_accountant_over_the_same_steps(accountant):
    rounds = [(1.1, 0.01, 250)] * 4
    assert compute_epsilon(rounds, delta=1e-5, accountant=accountant) == compute_epsilon(
        [(1.1, 0.01, 1000)], delta=1e-5, accountant=accountant
    )


def test_heterogeneous_history_costs_more_than_its_parts():
    a, b = (1.0, 0.02, 300), (2.0, 0.05, 300)
    both = compute_epsilon([a, b], delta=1e-5)
    assert both > compute_epsilon([a], delta=1e-5)
    assert both > compute_epsilon([b], delta=1e-5)


def test_merge_history_merges_only_consecutive_equal_mechanisms():
    assert merge_history([(1.0, 0.1, 5), (1.0, 0.1, 5), (2.0, 0.1, 1), (1.0, 0.1, 0), (1.0, 0.1, 3)]) == [
        (1.0, 0.1, 10),
        (2.0, 0.1, 1),
        (1.0, 0.1, 3),
    ]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibration_fits_the_budget_tightly(accountant):
    sigma = calibrate_noise(history=[], sample_rate=0.05, steps=200, target_epsilon=3.0, delta=1e-5, accountant=accountant)
    eps = compute_epsilon([(sigma, 0.05, 200)], delta=1e-5, accountant=accountant)
    assert 0.99 * 3.0 <= eps <= 3.0


def test_calibration_accounts_for_the_existing_history():
    history = [(1.5, 0.05, 400)]
    sigma = calibrate_noise(history=history, sample_rate=0.05, steps=200, target_epsilon=4.0, delta=1e-5)
    fresh = calibrate_noise(history=[], sample_rate=0.05, steps=200, target_epsilon=4.0, delta=1e-5)
    assert sigma > fresh
    assert compute_epsilon(history + [(sigma, 0.05, 200)], delta=1e-5) <= 4.0


def test_calibration_refuses_when_the_budget_is_spent():
    with pytest.raises(BudgetExhaustedError, match="already spent"):
        calibrate_noise(history=[(0.5, 0.5, 1000)], sample_rate=0.1, steps=10, target_epsilon=1.0, delta=1e-5)


def test_budget_check_refuses_the_round_that_would_overshoot():
    history = PrivacyHistory(delta=1e-5)
    round_ = (1.0, 0.1, 50)
    after_one, _ = history.check_budgets(round_, budget=50.0, run_budget=math.inf)
    history.record(round_)
    budget = after_one + 0.5 * (history.epsilon(extra=[round_]) - after_one)  # between 1 and 2 rounds
    with pytest.raises(BudgetExhaustedError) as err:
        history.check_budgets(round_, budget=budget, run_budget=math.inf)
    assert err.value.epsilon_now == pytest.approx(after_one)
    assert err.value.epsilon_after > budget and err.value.budget == budget
    assert history.entries == [round_]  # a refused round records nothing


def test_a_round_over_the_run_allowance_is_refused_naming_the_allowance():
    # Prepare: one round of run "a" on record; a lifetime cap with room, a run allowance between 1 and 2 rounds
    history = PrivacyHistory(delta=1e-5)
    round_ = (1.0, 0.1, 50)
    history.record(round_, run_id="a")
    one, two = history.epsilon(), history.epsilon(extra=[round_])
    allowance = one + 0.5 * (two - one)
    history.plan = NoisePlan(
        run_id="a",
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps_per_round=50,
        planned_rounds=2,
        target_epsilon=allowance,
        delta=1e-5,
        max_grad_norm=1.0,
    )
    # Execute
    with pytest.raises(BudgetExhaustedError, match="run allowance") as err:
        history.check_budgets(round_, budget=50.0, run_budget=allowance)
    # Assert: the error carries the run's allowance and the run ε it would reach, not the lifetime cap
    assert err.value.budget == allowance
    assert err.value.epsilon_after == pytest.approx(two) and err.value.epsilon_now == pytest.approx(one)
    assert history.entries == [round_]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(target_epsilon=0.0, delta=1e-5), "epsilon must be > 0"),
        (dict(target_epsilon=-1.0, delta=1e-5), "epsilon must be > 0"),
        (dict(target_epsilon=float("nan"), delta=1e-5), "epsilon must be > 0"),
        (dict(target_epsilon=1.0, delta=0.0), "delta must lie in"),
        (dict(target_epsilon=1.0, delta=1.0), "delta must lie in"),
        (dict(target_epsilon=1.0, delta=1e-5, max_grad_norm=0.0), "max grad norm"),
    ],
)
def test_invalid_privacy_parameters(kwargs, fragment):
    with pytest.raises(PrivacyParameterError, match=fragment):
        validate_privacy_parameters(**kwargs)


def test_history_json_round_trip_and_validation():
    plan = NoisePlan("run-1", 1.2, 0.05, 20, 10, 8.0, 1e-5, 1.0)
    history = PrivacyHistory(accountant="rdp", delta=1e-5, entries=[(1.2, 0.05, 20)], plan=plan)
    again = PrivacyHistory.from_json(history.to_json())
    assert again == history
    for bad in (
        '{"format": 1}',
        "[1, 2]",
        "not json",
        '{"format": 1, "accountant": "prv", "delta": 1e-5, "history": [[-1, 0.1, 3]]}',
        '{"format": 1, "accountant": "gdp", "delta": 1e-5, "history": []}',
    ):
        with pytest.raises(PrivacyParameterError):
            PrivacyHistory.from_json(bad)


def test_spend_is_formatted_for_people():
    assert format_spend(2.3149, 1e-5) == "(ε = 2.31, δ = 1e-05)"
    assert format_spend(math.inf, None) == "(ε = ∞, non-private)"
