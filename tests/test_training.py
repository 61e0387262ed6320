"""Local DP training: clipping, real noise, every encoder runs, fail-closed budget, bad input."""

import math

import pytest
import torch

from common.config import parse_run_config
from common.data import synthetic
from common.data.samples import MultimodalData, hide_modalities
from common.errors import BudgetExhaustedError, ConfigError, DataError, NonFiniteError, PrivacyParameterError
from common.model.multimodal import ModelConfig, MultimodalModel
from common.privacy.accounting import PrivacyHistory, compute_epsilon
from common.privacy.randomness import RoundRandomness
from common.privacy.training import FiniteRowsDPOptimizer, local_training, scheduled_lr, train_round
from tests.round_helpers import settings

CONFIG = ModelConfig(embed_dim=16, hidden_dim=16)
DP = dict(target_epsilon=4.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=2, local_epochs=1, batch_size=50)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_per_sample_gradients_are_clipped_to_max_grad_norm(synth_train, monkeypatch):
    # Prepare: spy on Opacus's clipping inside the real training path
    norms = []
    original = FiniteRowsDPOptimizer.clip_and_accumulate

    def spy(self):
        per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples]
        raw = torch.stack(per_param, dim=1).norm(2, dim=1)
        factor = (self.max_grad_norm / (raw + 1e-6)).clamp(max=1.0)
        norms.append((raw * factor).max().item() if len(raw) else 0.0)
        assert raw.max() > self.max_grad_norm  # clipping is really exercised
        return original(self)

    monkeypatch.setattr(FiniteRowsDPOptimizer, "clip_and_accumulate", spy)
    model = MultimodalModel(synth_train.schema, CONFIG)
    # Execute
    train_round(model, synth_train.subset(range(200)), PrivacyHistory(), **settings(**DP | dict(max_grad_norm=0.01)))
    # Assert
    assert len(norms) == 4 and max(norms) <= 0.01 * (1 + 1e-4)


def test_noise_is_added_even_to_an_encoder_no_sample_in_the_batch_uses(synth_train):
    # Prepare: a client with image + signal where no sample has the signal; q = 1 (one full batch)
    data = synth_train.subset(range(100)).restrict(["image", "signal"])
    mask = data.mask.clone()
    mask[:, 1] = False
    data = MultimodalData(data.schema, data.inputs, mask, data.labels)
    model = MultimodalModel(data.schema, CONFIG)
    before = state(model)
    # Execute: one DP-SGD step with plain SGD (lr = 1, no momentum)
    result = train_round(
        model,
        data,
        PrivacyHistory(),
        **settings(
            target_epsilon=2.0,
            delta=1e-5,
            max_grad_norm=1.0,
            planned_rounds=1,
            local_epochs=1,
            batch_size=100,
            lr=1.0,
            momentum=0.0,
        ),
    )
    # Assert: its gradient is exactly zero, so its update is pure noise of std sigma * C / expected batch
    assert result.steps == 1 and result.sample_rate == 1.0
    update = torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before if k.startswith("encoders.signal.")])
    expected = result.noise_multiplier * 1.0 / 100
    assert update.numel() > 4000
    assert update.std().item() == pytest.approx(expected, rel=0.05)
    assert update.mean().abs().item() < 4 * expected / math.sqrt(update.numel())


def test_non_private_training_adds_no_noise_and_reports_infinity(synth_train):
    data = synth_train.subset(range(100)).restrict(["image", "signal"])
    mask = data.mask.clone()
    mask[:, 1] = False
    data = MultimodalData(data.schema, data.inputs, mask, data.labels)
    model = MultimodalModel(data.schema, CONFIG)
    before = state(model)
    history = PrivacyHistory()
    result = train_round(model, data, history, **settings(**DP | dict(target_epsilon=math.inf)))
    assert not result.private and math.isinf(result.epsilon) and result.noise_multiplier is None
    # recorded with its real steps and no noise: the client's epsilon is infinite from now on
    assert history.entries == [(0.0, result.sample_rate, result.steps)] and result.steps > 0
    assert math.isinf(history.epsilon()) and history.non_private
    # the signal encoder received no gradient and no noise
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before if k.startswith("encoders.signal."))


def test_history_spans_rounds_and_matches_one_accountant(synth_train):
    data = synth_train.subset(range(200))
    model, history = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
    results = [train_round(model, data, history, **settings(**DP | dict(planned_rounds=3))) for _ in range(3)]
    sigma, q, steps = history.entries[0]
    assert history.entries == [(sigma, q, steps)] * 3
    assert results[-1].epsilon == pytest.approx(compute_epsilon([(sigma, q, 3 * steps)], delta=1e-5))
    assert results[0].epsilon < results[1].epsilon < results[2].epsilon <= 4.0
    # restoring from JSON continues the same history
    again = PrivacyHistory.from_json(history.to_json())
    assert again.epsilon() == pytest.approx(results[-1].epsilon)


def test_round_beyond_the_plan_is_refused_before_training(synth_train):
    data = synth_train.subset(range(200))
    model, history = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
    for _ in range(2):
        train_round(model, data, history, **settings(**DP))
    before, entries = state(model), list(history.entries)
    with pytest.raises(BudgetExhaustedError, match="over the budget"):
        train_round(model, data, history, **settings(**DP))
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert history.entries == entries


def test_changing_privacy_parameters_mid_run_is_refused(synth_train):
    data = synth_train.subset(range(200))
    model, history = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
    train_round(model, data, history, **settings(**DP))
    with pytest.raises(PrivacyParameterError, match="changed during run"):
        train_round(model, data, history, **settings(**DP | dict(batch_size=20)))
    with pytest.raises(PrivacyParameterError, match="one client's history must use one delta"):
        train_round(model, data, history, **settings(**DP | dict(delta=1e-6)))


def test_a_new_run_is_calibrated_against_the_remaining_budget(synth_train):
    data = synth_train.subset(range(200))
    model, history = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
    first = train_round(model, data, history, **settings(**DP | dict(run_id="a")))
    second = train_round(model, data, history, **settings(**DP | dict(run_id="b")))
    assert second.noise_multiplier > first.noise_multiplier
    assert second.epsilon <= 4.0


@pytest.mark.parametrize(
    "bad",
    [
        dict(target_epsilon=0.0),
        dict(delta=1.5),
        dict(max_grad_norm=-1.0),
        dict(batch_size=0),
        dict(local_epochs=0),
        dict(planned_rounds=0),
    ],
)
def test_invalid_parameters_train_nothing(synth_train, bad):
    data = synth_train.subset(range(50))
    model = MultimodalModel(data.schema, CONFIG)
    before = state(model)
    with pytest.raises(PrivacyParameterError):
        train_round(model, data, PrivacyHistory(), **settings(**DP | bad))
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_data_that_does_not_match_the_clients_schema_is_rejected(synth_train):
    model = MultimodalModel(synth_train.schema.restrict(["image", "tabular"]), CONFIG)
    with pytest.raises(DataError, match="do not match the client's schema"):
        train_round(model, synth_train.subset(range(50)), PrivacyHistory(), **settings(**DP))


def test_records_whose_loss_overflows_take_no_part_and_the_round_is_kept(synth_train):
    # Prepare: finite but enormous inputs overflow the forward pass of every record
    data = synth_train.subset(range(100))
    huge = {n: (x * 1e38 if x.is_floating_point() else x) for n, x in data.inputs.items()}
    data = MultimodalData(data.schema, huge, data.mask, data.labels)
    model, history = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
    # Execute: handled inside the mechanism (zero per-sample gradients before clipping), no abort
    result = train_round(model, data, history, **settings(**DP))
    # Assert: the round is kept (its noised parameters are finite) and accounted like any other
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert result.private and len(history.entries) == 1 and result.steps == history.entries[0][2]


def test_a_round_whose_noised_parameters_diverge_is_discarded_but_charged(synth_train):
    # Prepare: a learning rate so large that the noised update overflows (decided from DP outputs only)
    data = synth_train.subset(range(100))
    model, history = MultimodalModel(data.schema, CONFIG), PrivacyHistory()
    before = state(model)
    # Execute
    with pytest.raises(NonFiniteError, match="discarded"):
        train_round(model, data, history, **settings(**DP | dict(max_grad_norm=1e3, lr=1e38)))
    # Assert: model untouched; the data was used, so the round is accounted (fail closed)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert len(history.entries) == 1


def test_modality_dropout_keeps_at_least_one_present_modality():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand((1000, 3), generator=gen) < 0.7
    mask[~mask.any(1), 0] = True
    for dropped in (
        hide_modalities(mask, 0.9, gen),
        RoundRandomness().hide_modalities(0, torch.arange(1000), mask, 0.9, num_examples=1000),
    ):
        assert dropped.any(dim=1).all()
        assert not (dropped & ~mask).any()  # never adds a modality
        assert dropped.sum() < 0.5 * mask.sum()


def test_fusion_beats_every_single_modality_on_the_synthetic_data():
    # Prepare
    torch.manual_seed(0)
    train, test = synthetic.generate(1200, seed=1), synthetic.generate(600, seed=2)
    model = MultimodalModel(train.schema, ModelConfig())
    # Execute: non-private, with modality dropout so that single modalities are learned too
    train_round(
        model,
        train,
        PrivacyHistory(),
        **settings(
            **DP | dict(target_epsilon=math.inf, local_epochs=15, batch_size=32, lr=0.1, momentum=0.9, modality_dropout=0.5)
        ),
    )
    from common.model.evaluation import evaluate

    report = evaluate(model, test)
    # Assert: about 1/2 for one modality, 5/6 for two, ~1 for all three
    singles = [report["by_modalities"][m]["accuracy"] for m in ("image", "signal", "tabular")]
    assert report["by_modalities"]["image+signal+tabular"]["accuracy"] > 0.9
    assert max(singles) < 0.6
    assert report["accuracy"] > max(singles) + 0.3


def test_noise_and_sampling_are_fresh_even_when_the_global_rng_repeats(synth_train):
    # Prepare: the same start twice, with torch's global RNG reset to the same seed each time
    data = synth_train.subset(range(200))
    updates = []
    for _ in range(2):
        torch.manual_seed(1234)
        model = MultimodalModel(data.schema, CONFIG)
        before = state(model)
        torch.manual_seed(1234)
        train_round(model, data, PrivacyHistory(), **settings(**DP))
        updates.append(torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before]))
    # Assert: DP noise (and Poisson batches) must never repeat across rounds or restarts
    assert not torch.allclose(updates[0], updates[1])


def test_the_cosine_schedule_is_a_public_function_of_the_round():
    # lr in round 1, lr / 10 in the last, the mean of the two half-way; constant keeps lr
    assert [scheduled_lr(0.4, "cosine", r, 5) for r in (1, 3, 5)] == pytest.approx([0.4, 0.22, 0.04])
    assert scheduled_lr(0.4, "constant", 5, 5) == 0.4
    config = parse_run_config({"train.lr-schedule": "cosine", "train.lr": 0.4, "num-server-rounds": 5})
    assert local_training(config.train, server_round=5, total_rounds=5).lr == pytest.approx(0.04)
    with pytest.raises(ConfigError, match="train.lr-schedule"):
        parse_run_config({"train.lr-schedule": "step"})
