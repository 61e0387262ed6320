"""`fedfuse plan`: each site's noise multiplier and noise-to-signal ratio from public parameters only."""

import json
import math

import pytest

from common.config import parse_run_config
from common.data import synthetic
from common.data.site_folders import write_site
from common.model.multimodal import ModelConfig, MultimodalModel
from common.privacy.accounting import PrivacyHistory, calibrate_run
from common.privacy.plan import DROWNING, Setting, candidates, drowning_warning, plan, plan_site, suggest
from common.privacy.training import DPRequest, LocalTraining, train_round
from fedfuse.cli import main
from simulations.scenario import build_config


def test_a_site_plan_is_the_projects_calibration_and_the_stated_formulas():
    # Execute: 100 examples, batch 32 -> q = 32/100 and ceil(100/32) = 4 steps per epoch, 2 epochs, 5 rounds
    site = plan_site("s", 100, 10_000, Setting(32, 5, 2), epsilon=4.0, delta=1e-5, accountant="rdp")
    # Assert
    sigma = calibrate_run(
        history=[], sample_rate=0.32, steps=40, run_budget=4.0, lifetime_budget=4.0, delta=1e-5, accountant="rdp"
    )
    assert (site.sample_rate, site.expected_batch, site.steps_per_round) == (0.32, 32.0, 8)
    assert site.noise_multiplier == pytest.approx(sigma)
    assert site.nsr_step == pytest.approx(sigma * 100 / 32)  # σ·√d / B
    assert site.nsr_round == pytest.approx(sigma * 100 / 32 / math.sqrt(8))  # σ·√d / (B·√T)
    assert plan_site("s", 100, 10_000, Setting(32, 5, 2), epsilon=math.inf, delta=1e-5).noise_multiplier is None


@pytest.mark.parametrize("n, batch, epochs", [(81, 64, 1), (250, 32, 2)])
def test_the_plan_gives_the_sigma_and_q_a_site_calibrates_in_its_first_round(synth_train, n, batch, epochs):
    # Prepare: a fresh site declaring n examples, a run of 30 rounds at ε = 8 (allowance = lifetime cap, as simulated)
    data = synth_train.subset(range(n))
    model = MultimodalModel(data.schema, ModelConfig(embed_dim=8, hidden_dim=8))
    # Execute: the planner, and the real first round of the same run
    site = plan_site("s", n, 1, Setting(batch, 30, epochs), epsilon=8.0, delta=1e-5, accountant="prv")
    result = train_round(
        model,
        data,
        PrivacyHistory(accountant="prv"),
        dp=DPRequest(8.0, 1e-5, 1.0, planned_rounds=30, max_epsilon=8.0),
        training=LocalTraining(local_epochs=epochs, batch_size=batch),
        declared_examples=n,
    )
    # Assert: the same q (batch / N, not 1 / steps per epoch), steps and σ
    assert (site.sample_rate, site.steps_per_round, site.noise_multiplier) == (
        result.sample_rate,
        result.steps,
        result.noise_multiplier,
    )
    assert site.sample_rate == batch / n


def test_the_aggregated_head_and_tiny_sites():
    # Prepare: one tiny site and one large one under the same budget
    sites = {"tiny": (40, 20_000), "large": (4000, 20_000)}
    # Execute
    p = plan(sites, 900, Setting(64, 30, 1), epsilon=2.0, delta=1e-5, accountant="rdp")
    tiny, large = p.sites
    # Assert: the tiny site drowns, the large one does not; the head's ratio follows its formula
    assert p.drowned == ["tiny"] and tiny.nsr_round > DROWNING > large.nsr_round
    w = [40 / 4040, 4000 / 4040]
    noise = sum(wk**2 * s.steps_per_round * (s.noise_multiplier / s.expected_batch) ** 2 for wk, s in zip(w, p.sites))
    assert p.nsr_head == pytest.approx(30 * math.sqrt(noise) / sum(wk * s.steps_per_round for wk, s in zip(w, p.sites)))


def test_suggestions_keep_the_rounds_unless_no_batch_size_can_save_them():
    sites = {"a": (100, 20_000), "b": (100, 20_000)}
    base = Setting(16, 12, 1)
    plans = [plan(sites, 900, s, epsilon=8.0, delta=1e-5, accountant="rdp") for s in candidates(base, 100)]
    picked = suggest(plans, base)
    assert picked.setting.rounds == 12 and picked.setting.batch_size > 16 and not picked.drowned
    assert max(s.nsr_round for s in picked.sites) < max(s.nsr_round for s in plans[0].sites)
    # with a thousand times more parameters every batch size drowns at 12 rounds: fewer rounds are suggested too
    huge = {k: (n, d * 1000) for k, (n, d) in sites.items()}
    tight = [plan(huge, 900, s, epsilon=8.0, delta=1e-5, accountant="rdp") for s in candidates(base, 100)]
    assert suggest(tight, base).setting.rounds < 12


@pytest.fixture
def tiny_sites(tmp_path):
    data = synthetic.generate(60, seed=1)
    for name in ("a", "b"):
        write_site(tmp_path / name, data, ["train"] * 50 + ["test"] * 10, name=name)
    return tmp_path


def test_cli_prints_one_row_per_site_and_setting_and_warns(tiny_sites, capsys):
    args = [
        "plan",
        "--data",
        str(tiny_sites),
        "--set",
        "dp.accountant=rdp",
        "--set",
        "dp.epsilon=1.0",
        "--set",
        "num-server-rounds=40",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "configured: batch 64, 40 rounds, 1 epoch(s)" in out
    assert out.count("│ a ") >= 1 and out.count("│ b ") >= 1
    assert "noise drowns the signal at 2 site(s)" in out and "suggested: --set train.batch-size=" in out
    assert main(args + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["site"] for s in doc["configured"]["sites"]] == ["a", "b"] and doc["configured"]["drowned"] == ["a", "b"]
    assert doc["configured"]["sites"][0]["n"] == 50


def test_a_run_that_will_drown_is_warned_about_before_it_starts(tiny_sites):
    flat = build_config(None, [f"data.dataset={json.dumps(str(tiny_sites))}", "dp.epsilon=1.0", "num-server-rounds=40"])
    assert "drown the signal at 2 of 2 site(s)" in drowning_warning(parse_run_config(flat))
    roomy = build_config(None, [f"data.dataset={json.dumps(str(tiny_sites))}", "dp.epsilon=inf"])
    assert drowning_warning(parse_run_config(roomy)) is None


@pytest.mark.parametrize("overrides, planned", [(["fraction-train=0.5"], 8), (["fraction-train=0.5", "participation=3"], 3)])
def test_with_client_sampling_the_plan_calibrates_for_the_rounds_each_site_is_planned_to_train(tiny_sites, overrides, planned):
    # Prepare: 12 rounds, half the clients sampled each round: each site plans ceil(1.25 x 12 x 0.5) = 8 rounds
    # (or the participation set); the server announces that plan and the client calibrates for it
    flat = build_config(None, [f"data.dataset={json.dumps(str(tiny_sites))}", "num-server-rounds=12", *overrides])
    config = parse_run_config(flat)
    data = synthetic.generate(60, seed=1).subset(range(50))  # a tiny site's 50 training records
    # Execute: the plan, and a fresh site's real first round under the announced plan
    from fedfuse.commands.plan import make_plans

    plans = make_plans(config)
    site = plans["configured"].sites[0]
    result = train_round(
        MultimodalModel(data.schema, config.model),
        data,
        PrivacyHistory(accountant=config.dp.accountant),
        dp=DPRequest(config.dp.epsilon, config.dp.delta, 1.0, planned_rounds=config.server.planned_rounds(), max_epsilon=8.0),
        training=LocalTraining(local_epochs=1, batch_size=config.train.batch_size),
        declared_examples=50,
    )
    # Assert: the planned σ is the σ the client calibrates (not the larger one for all 12 rounds); candidates too
    assert config.server.planned_rounds() == plans["configured"].setting.trained_rounds == planned
    assert site.noise_multiplier == pytest.approx(result.noise_multiplier, rel=1e-9)
    every_round = plan_site("a", 50, 1, Setting(64, 12, 1), epsilon=8.0, delta=1e-5, accountant=config.dp.accountant)
    assert site.noise_multiplier < every_round.noise_multiplier
    halved = next(p for p in plans["candidates"] if p.setting.rounds == 6)
    assert halved.setting.trained_rounds == config.server.planned_rounds(6)
