"""Privacy accounting across runs: non-private rounds, calibration with the history's accountant, the run's
allowance against the site's lifetime cap, the declared training-set size, and the audit's one-sided rule."""

from __future__ import annotations

import math

import pytest
import torch

from client.handlers import handle_train
from client.site import resolve_site
from common import messages as M
from common.config import parse_run_config
from common.data import synthetic
from common.data.site_folders import write_site
from common.errors import BudgetExhaustedError, ConfigError, NonPrivateHistoryError
from common.model.multimodal import ModelConfig, MultimodalModel
from common.privacy.accounting import PrivacyHistory, calibrate_noise, compute_epsilon
from common.privacy.audit import (
    EXIT_CODES,
    UNDER_REPORT_SLACK,
    audit_path,
    epsilon_from_history,
)
from common.privacy.ledger import ACCOUNTING, OVER_BUDGET, Ledger, LedgerKey, entry_fields, read_ledger
from common.privacy.training import train_round
from tests.round_helpers import settings
from tests.test_client import context, global_head, run_config, train_message

pytestmark = pytest.mark.usefixtures("task_identity")

CONFIG = ModelConfig(embed_dim=16, hidden_dim=16)
DP = dict(target_epsilon=4.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=2, local_epochs=1, batch_size=50)
DELTA = 1e-5


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- issue 9, item 1: a non-private round is on record and makes epsilon infinite for good -------------


def test_a_non_private_history_refuses_a_later_private_run(synth_train):
    # Prepare: two rounds without DP (dp.epsilon = inf)
    data = synth_train.subset(range(200))
    model, history = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
    for _ in range(2):
        result = train_round(model, data, history, **settings(**DP | dict(target_epsilon=math.inf, run_id="open")))
        assert not result.private and result.steps == 4
    assert history.entries == [(0.0, 0.25, 4)] * 2 and math.isinf(history.epsilon())
    before, entries = state(model), list(history.entries)
    # Execute / Assert: a private run on the same state is refused before any data is touched
    with pytest.raises(NonPrivateHistoryError, match="already trained without differential privacy") as err:
        train_round(model, data, history, **settings(**DP | dict(run_id="private")))
    assert math.isinf(err.value.epsilon_now) and err.value.budget == 4.0
    assert isinstance(err.value, BudgetExhaustedError)  # the handler records it as a refusal
    assert history.entries == entries and all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_the_issue_repro_through_the_client_is_refused_recorded_and_audited(tmp_path):
    # Prepare: 2 rounds at dp.epsilon = inf, then a run at dp.epsilon = 4 on the same state folder
    open_ = run_config(tmp_path, **{"dp.epsilon": math.inf})
    for r in (1, 2):
        reply = handle_train(train_message(global_head(), server_round=r, run_id="open"), context(open_))
        assert reply.content[M.CLIENT][M.STATUS] == M.STATUS_OK
    private = run_config(tmp_path, **{"dp.epsilon": 4.0})
    # Execute
    reply = handle_train(train_message(global_head(), server_round=1, run_id="private"), context(private))
    # Assert: refused with a clear reason, nothing sent, infinite epsilon reported
    ident, metrics = reply.content[M.CLIENT], reply.content[M.METRICS]
    assert ident[M.STATUS] == M.STATUS_BUDGET_EXHAUSTED and "without differential privacy" in ident[M.REASON]
    assert not M.unpack_arrays(reply.content) and math.isinf(metrics[M.EPSILON])
    entries = Ledger(tmp_path / "clients" / "client-00" / "ledger.jsonl").entries()
    assert [e["status"] for e in entries] == ["trained", "trained", "refused-budget"]
    assert [e["mechanism"]["steps"] for e in entries] == [4, 4, 0]  # the real steps of the open rounds
    assert [e["private"] for e in entries] == [False, False, True]
    assert entries[2]["epsilon"] is None and entries[2]["run_budget"] == 4.0  # ε = ∞, as JSON null
    # the audit passes the honest ledger and reports the client as non-private (ε = ∞)
    report = audit_path(tmp_path)
    client = report.clients["client-00"]
    assert report.ok and not client.private and math.isinf(client.recomputed[0])
    assert client.to_json()["status"] == "ok (non-private)"


def _signed(tmp_path, rows, name="ledger"):
    """A signed ledger of client site-a, alone in folder ``name``."""
    key = LedgerKey.load_or_create(tmp_path / "key.pem")
    ledger = Ledger(tmp_path / name / "site-a.jsonl")
    for row in rows:
        ledger.append(row, key)
    return tmp_path / name


def _row(
    r, mech, epsilon, *, budget=8.0, run_budget=None, run_epsilon=None, run_id="run-1", status="trained", accountant="prv", **over
):
    sigma, q, steps = mech
    fields = entry_fields(
        run_id=run_id,
        client_id="site-a",
        round=r,
        status=status,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        max_grad_norm=1.0,
        delta=DELTA,
        accountant=accountant,
        epsilon=epsilon,
        budget=budget,
        update_hash=None if status != "trained" else f"{r:064x}",
        run_epsilon=epsilon if run_epsilon is None else run_epsilon,
        run_budget=budget if run_budget is None else run_budget,
    )
    return fields | over


def test_audit_fails_a_finite_epsilon_claimed_after_a_non_private_round(tmp_path):
    # Prepare: an open round (no noise, 40 steps), then a private round claiming the epsilon of its own steps
    mech = (1.1, 0.01, 250)
    eps = compute_epsilon([mech], delta=DELTA)
    rows = [_row(1, (0.0, 0.01, 40), None, budget=math.inf, run_id="open"), _row(1, mech, eps, run_id="laundered")]
    # Execute
    report = audit_path(_signed(tmp_path, rows))
    # Assert
    client = report.clients["site-a"]
    assert not report.ok and not client.private
    assert {ACCOUNTING, OVER_BUDGET} <= client.kinds
    assert any("trained without noise" in f.message for f in client.findings)
    assert report.exit_status == EXIT_CODES[OVER_BUDGET]


# --- issue 9, item 9: one-sided tolerance --------------------------------------------------------------


def test_a_small_under_report_fails_and_an_honest_over_report_passes(tmp_path):
    mech = (1.1, 0.01, 1000)
    honest = compute_epsilon([mech], delta=DELTA)  # Opacus PRV: 1.5255, PLD 1.5154
    pld = epsilon_from_history([mech], delta=DELTA, accountant="prv", fine=True)
    assert honest > pld
    ok = audit_path(_signed(tmp_path, [_row(1, mech, honest)], "honest"))
    assert ok.ok
    # 1.9 % below PLD: passed the old symmetric ±2 %, now an accounting disagreement
    low = audit_path(_signed(tmp_path, [_row(1, mech, pld * 0.981)], "low"))
    assert low.clients["site-a"].kinds == {ACCOUNTING}
    assert any("under-reported" in f.message for f in low.clients["site-a"].findings)
    # just within the accountant's own error: tolerated
    edge = audit_path(_signed(tmp_path, [_row(1, mech, pld - 0.5 * UNDER_REPORT_SLACK)], "edge"))
    assert edge.ok


def test_a_recomputed_epsilon_just_over_budget_fails(tmp_path):
    mech = (1.1, 0.01, 1000)
    pld = epsilon_from_history([mech], delta=DELTA, accountant="prv")
    # recorded exactly at the budget, recomputed 1.9 % over it: passed the old ±2 % on both checks
    budget = pld / 1.019
    report = audit_path(_signed(tmp_path, [_row(1, mech, budget, budget=budget)]))
    assert report.clients["site-a"].kinds == {ACCOUNTING, OVER_BUDGET}
    assert any("recomputed ε" in f.message and "over its budget" in f.message for f in report.clients["site-a"].findings)


def test_honest_prv_at_a_small_sampling_rate_is_not_flagged(tmp_path):
    # PLD at interval 1e-3 is 0.027 above PLD at 1e-4 here, above Opacus's PRV: the audit refines before it judges
    mech = (1.5, 0.001, 5000)
    recorded = compute_epsilon([mech], delta=DELTA)
    assert recorded < epsilon_from_history([mech], delta=DELTA, accountant="prv")
    assert audit_path(_signed(tmp_path, [_row(1, mech, recorded)])).ok


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 12.0])
def test_rdp_ledgers_agree_exactly(tmp_path, epsilon):
    q, steps = 0.05, 200
    sigma = calibrate_noise(history=[], sample_rate=q, steps=steps, target_epsilon=epsilon, delta=DELTA, accountant="rdp")
    recorded = compute_epsilon([(sigma, q, steps)], delta=DELTA, accountant="rdp")
    recomputed = epsilon_from_history([(sigma, q, steps)], delta=DELTA, accountant="rdp")
    assert recorded == pytest.approx(recomputed, rel=1e-9)
    assert audit_path(_signed(tmp_path, [_row(1, (sigma, q, steps), recorded, budget=epsilon, accountant="rdp")])).ok


def test_format_1_ledgers_still_verify(tmp_path):
    # A ledger written by the previous format: version 1, no run fields, RDP over Opacus's fractional orders
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    mech = (1.1, 0.01, 1000)
    acc.history = [mech]
    legacy = float(acc.get_epsilon(delta=DELTA))
    rows = []
    for accountant, eps in (("rdp", legacy),):
        row = _row(1, mech, eps, accountant=accountant)
        for key in ("run_epsilon", "run_budget"):
            row.pop(key)
        rows.append(row | {"version": 1})
    assert audit_path(_signed(tmp_path, rows)).ok
    prv = _row(1, mech, compute_epsilon([mech], delta=DELTA))
    for key in ("run_epsilon", "run_budget"):
        prv.pop(key)
    assert audit_path(_signed(tmp_path, [prv | {"version": 1}], "v1-prv")).ok


# --- issue 9, item 10: calibrate and refuse with the history's own accountant --------------------------


def test_calibration_does_not_refuse_on_rdp_while_prv_budget_remains():
    history = [(1.0, 0.1, 79)]  # PRV 6.32, RDP 7.31: over a budget of 7 by RDP only
    assert compute_epsilon(history, delta=DELTA) == pytest.approx(6.32, abs=0.01)
    assert compute_epsilon(history, delta=DELTA, accountant="rdp") > 7
    sigma = calibrate_noise(history=history, sample_rate=0.1, steps=10, target_epsilon=7.0, delta=DELTA)
    after = compute_epsilon(history + [(sigma, 0.1, 10)], delta=DELTA)
    assert 0.99 * 7.0 <= after <= 7.0
    # a refusal, when it comes, records the PRV epsilon the history really has
    with pytest.raises(BudgetExhaustedError) as err:
        calibrate_noise(history=history, sample_rate=0.1, steps=10, target_epsilon=6.3, delta=DELTA)
    assert err.value.epsilon_now == pytest.approx(compute_epsilon(history, delta=DELTA))


# --- issue 15, item 2: the run's allowance and the site's lifetime cap --------------------------------


def test_a_run_spends_its_own_allowance_within_the_lifetime_cap(synth_train):
    data = synth_train.subset(range(200))
    model, history = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
    first = train_round(
        model, data, history, **settings(**DP | dict(target_epsilon=2.6, max_epsilon=8.0, run_id="a", planned_rounds=1))
    )
    assert first.run_epsilon == pytest.approx(first.epsilon) and first.epsilon <= 2.6
    # Execute: a second run asking for ε = 5 at a site capped at 8 over its lifetime
    second = train_round(
        model, data, history, **settings(**DP | dict(target_epsilon=5.0, max_epsilon=8.0, run_id="b", planned_rounds=1))
    )
    # Assert: this run's own ε reaches (nearly) 5, the lifetime ε exceeds 5 and stays within 8
    assert 0.99 * 5.0 <= second.run_epsilon <= 5.0
    assert 5.0 < second.epsilon <= 8.0
    assert history.runs == ["a", "b"]
    assert second.run_epsilon == pytest.approx(history.run_epsilon("b"))
    # a tight lifetime cap wins: more noise, lifetime ε within the cap, run ε below its allowance
    model2, history2 = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
    train_round(
        model2, data, history2, **settings(**DP | dict(target_epsilon=2.6, max_epsilon=5.2, run_id="a", planned_rounds=1))
    )
    capped = train_round(
        model2, data, history2, **settings(**DP | dict(target_epsilon=5.0, max_epsilon=5.2, run_id="b", planned_rounds=1))
    )
    assert 0.99 * 5.2 <= capped.epsilon <= 5.2 and capped.run_epsilon < 0.99 * 5.0
    assert capped.noise_multiplier > second.noise_multiplier


def test_a_fresh_simulated_client_is_calibrated_as_before(synth_train):
    # In simulation both budgets are the scenario's: a fresh state gets exactly today's noise
    data = synth_train.subset(range(200))
    a = train_round(MultimodalModel(data.schema, CONFIG), data, PrivacyHistory(), **settings(**DP))
    b = train_round(MultimodalModel(data.schema, CONFIG), data, PrivacyHistory(), **settings(**DP | dict(max_epsilon=4.0)))
    assert a.noise_multiplier == b.noise_multiplier and a.run_epsilon == pytest.approx(a.epsilon)


def test_both_figures_are_in_the_ledger_and_the_audit_checks_both(tmp_path):
    mech = (1.1, 0.01, 250)
    first = compute_epsilon([mech], delta=DELTA)
    both = compute_epsilon([mech, mech], delta=DELTA)
    rows = [
        _row(1, mech, first, budget=8.0, run_budget=first + 0.01, run_id="a"),
        _row(1, mech, both, budget=8.0, run_budget=first + 0.01, run_epsilon=first, run_id="b"),
    ]
    assert audit_path(_signed(tmp_path, rows)).ok
    # the run's own ε under-reported (claims the lifetime spend is all from earlier runs): fails
    bad = rows[:1] + [dict(rows[1], run_epsilon=first * 0.9)]
    report = audit_path(_signed(tmp_path, bad, "bad"))
    assert report.clients["site-a"].kinds == {ACCOUNTING}
    # a run over its own allowance (while within the lifetime cap): over budget
    over = rows[:1] + [dict(rows[1], run_budget=first * 0.95)]
    report = audit_path(_signed(tmp_path, over, "over"))
    assert OVER_BUDGET in report.clients["site-a"].kinds
    assert any("run's allowance" in f.message for f in report.clients["site-a"].findings)


def test_an_upgraded_client_with_old_spend_over_the_allowance_trains_within_its_lifetime_cap(synth_train):
    # Prepare: a history written by an older fedfuse (entries name no run) that spent ε 15.1 > dp.epsilon = 4
    history = PrivacyHistory(delta=DELTA, entries=[(1.0, 0.5, 20)])
    spent = history.epsilon()
    assert history.runs == [""] and spent > 4.0
    data = synth_train.subset(range(200))
    # Execute: a run with allowance 4 at a site capped at 20 over its lifetime
    result = train_round(
        MultimodalModel(data.schema, CONFIG),
        data,
        history,
        **settings(**DP | dict(target_epsilon=4.0, max_epsilon=20.0, run_id="new")),
    )
    # Assert: trained; the old spend counts towards the lifetime cap only, not towards this run's allowance
    assert result.private and history.runs == ["", "new"]
    assert result.run_epsilon == pytest.approx(history.run_epsilon("new")) and result.run_epsilon <= 4.0
    assert spent < result.epsilon <= 20.0
    assert history.run_epsilon("") == 0.0  # no run owns the older entries


def test_the_audit_counts_format_1_entries_towards_the_lifetime_cap_only(tmp_path):
    # A site upgraded during run "a": its format-1 entry of run "a" is in its lifetime ε, not in the run's own ε
    old, new = (1.0, 0.5, 20), (1.1, 0.01, 250)
    lifetime = compute_epsilon([old, new], delta=DELTA)
    first = _row(1, old, compute_epsilon([old], delta=DELTA), budget=30.0, run_id="a") | {"version": 1}
    for key in ("run_epsilon", "run_budget"):
        first.pop(key)
    own = compute_epsilon([new], delta=DELTA)
    rows = [first, _row(2, new, lifetime, budget=30.0, run_budget=4.0, run_epsilon=own, run_id="a")]
    report = audit_path(_signed(tmp_path, rows))
    assert report.ok, report.clients["site-a"].findings
    assert report.clients["site-a"].run_recomputed[1] == pytest.approx(own, rel=0.02)


def _deployed_site(tmp_path, n=50):
    data = synthetic.generate(n + 10, seed=1)
    write_site(tmp_path / "site", data, ["train"] * n + ["test"] * 10, name="hospital-a")
    return {"data-dir": str(tmp_path / "site"), "state-dir": str(tmp_path / "state"), "max-epsilon": 8.0}


def test_a_deployed_site_records_lifetime_and_run_figures(tmp_path):
    node = _deployed_site(tmp_path) | {"num-train-examples": 50}
    for run_id, eps in (("run-1", 2.6), ("run-2", 5.0)):
        flat = run_config(tmp_path, **{"dp.epsilon": eps})
        reply = handle_train(train_message(global_head(), planned=1, run_id=run_id), context(flat, node))
        assert reply.content[M.CLIENT][M.STATUS] == M.STATUS_OK
    entries, _ = read_ledger(tmp_path / "state" / "ledger.jsonl")
    last = entries[-1]
    assert last["budget"] == 8.0 and last["run_budget"] == 5.0
    assert 4.95 <= last["run_epsilon"] <= 5.0 < last["epsilon"] <= 8.0
    assert audit_path(tmp_path / "state" / "ledger.jsonl").ok


# --- issue 9, item 11: the mechanism comes from a public declared size ---------------------------------


def test_neighbouring_datasets_get_the_same_mechanism(synth_train):
    declared = 200
    results = []
    for n in (199, 200, 201):  # D - x, D, D + x
        data = synth_train.subset(range(n))
        model, history = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
        results.append(train_round(model, data, history, **settings(**DP | dict(declared_examples=declared))))
    assert len({(r.sample_rate, r.steps, r.noise_multiplier, r.num_examples) for r in results}) == 1
    assert results[0].sample_rate == 50 / 200 and results[0].steps == 4 and results[0].num_examples == declared


def test_a_deployed_site_must_declare_its_training_set_size(tmp_path, caplog):
    node = _deployed_site(tmp_path)
    flat = parse_run_config(run_config(tmp_path))
    with pytest.raises(ConfigError, match="num-train-examples.*required.*fedfuse data validate"):
        resolve_site(node, flat, 5)
    with pytest.raises(ConfigError, match="positive integer"):
        resolve_site(node | {"num-train-examples": "50"}, flat, 5)
    # far off the count (50 records): a warning at the site, no refusal (it would reach the server)
    with caplog.at_level("WARNING", logger="client.site"):
        far = resolve_site(node | {"num-train-examples": 500}, flat, 5)
    assert far.declared_examples == 500 and "far from" in caplog.text
    site = resolve_site(node | {"num-train-examples": 60}, flat, 5)
    assert site.declared_examples == 60 and len(site.train) == 50
    # the reply's aggregation weight is the declared size, not the count
    reply = handle_train(
        train_message(global_head()), context(run_config(tmp_path, **{"dp.epsilon": 4.0}), node | {"num-train-examples": 60})
    )
    assert reply.content[M.METRICS][M.NUM_EXAMPLES] == 60
    assert reply.content[M.METRICS][M.SAMPLE_RATE] == 60 / 60  # batch 60 / declared 60


def test_a_declared_size_far_from_the_count_does_not_change_the_reply_status(tmp_path):
    # Whether the declared size is far from the records' count is a function of the count: the reply must not say
    node = _deployed_site(tmp_path) | {"num-train-examples": 500}  # 50 records
    reply = handle_train(train_message(global_head()), context(run_config(tmp_path, **{"dp.epsilon": 4.0}), node))
    assert reply.content[M.CLIENT][M.STATUS] == M.STATUS_OK
    assert reply.content[M.METRICS][M.NUM_EXAMPLES] == 500


def test_the_server_reads_each_sites_spend_before_the_run_from_its_ledger():
    from server.strategy import spend_before_run

    mech = (1.1, 0.01, 250)
    a = _row(1, mech, 1.2, run_id="a")
    b = _row(1, mech, 1.9, run_id="b")
    assert spend_before_run([], "a") == 0.0
    assert spend_before_run([a], "a") == 0.0
    assert spend_before_run([a, b], "b") == 1.2
    assert spend_before_run([_row(1, (0.0, 0.01, 40), None, budget=math.inf, run_id="open"), a], "a") is None


def test_data_validate_prints_the_size_to_declare(tmp_path, capsys):
    from fedfuse.cli import main

    _deployed_site(tmp_path, n=50)
    assert main(["data", "validate", str(tmp_path / "site")]) == 0
    assert "declare num-train-examples=50" in capsys.readouterr().out
