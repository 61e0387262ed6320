"""Augmentation with multiplicity: rotations, per-record secret draws, averaging before clipping, clear errors."""

import warnings

import pytest
import torch

from common.config import GRAD_SAMPLE_MODES, parse_run_config
from common.data.samples import MultimodalData
from common.data.schema import DatasetSchema, ModalitySpec
from common.errors import ConfigError
from common.model.multimodal import ModelConfig, MultimodalModel
from common.privacy.accounting import PrivacyHistory
from common.privacy.augmentation import parse_augmentations
from common.privacy.randomness import RoundRandomness
from common.privacy.training import DPRequest, LocalTraining, dp_step, local_training, private_training, train_round

SCHEMA = DatasetSchema(
    (ModalitySpec("acc", "signal", (3, 16)), ModalitySpec("gyro", "signal", (6, 16)), ModalitySpec("tab", "tabular", (4,))),
    ("a", "b", "c"),
)


def records(n: int, seed: int = 0) -> MultimodalData:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "acc": torch.randn(n, 3, 16, generator=g),
        "gyro": torch.randn(n, 6, 16, generator=g),
        "tab": torch.randn(n, 4, generator=g),
    }
    return MultimodalData(SCHEMA, inputs, torch.ones(n, 3, dtype=torch.bool), torch.randint(0, 3, (n,), generator=g))


def test_rotations_turn_every_axis_triple_of_a_group_by_the_same_rotation_and_keep_lengths():
    # Prepare
    aug = parse_augmentations("acc+gyro=rotate(180)", multiplicity=3)
    data = records(4)
    draws = RoundRandomness(7).augmentation_draws(0, torch.arange(4), copies=3, width=aug.width, num_examples=4)
    # Execute
    out = aug.apply(data.inputs, draws)
    # Assert: K copies per record, record-major; norms of each (x, y, z) kept; untouched modalities copied
    assert out["acc"].shape == (12, 3, 16) and out["gyro"].shape == (12, 6, 16)
    torch.testing.assert_close(out["acc"].norm(dim=1), data.inputs["acc"].repeat_interleave(3, 0).norm(dim=1))
    torch.testing.assert_close(out["tab"], data.inputs["tab"].repeat_interleave(3, 0))
    assert not torch.allclose(out["acc"][0], out["acc"][1])  # two copies of record 0 differ
    # one rotation per record and copy, shared by acc and gyro's two triples: R = out x^T (x x^T)^-1
    x, y = data.inputs["acc"][0], out["acc"][0]
    rotation = y @ x.T @ torch.linalg.inv(x @ x.T)
    torch.testing.assert_close(out["gyro"][0, :3], rotation @ data.inputs["gyro"][0, :3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["gyro"][0, 3:], rotation @ data.inputs["gyro"][0, 3:], atol=1e-4, rtol=1e-4)


def test_the_largest_angle_bounds_the_rotation():
    aug = parse_augmentations("acc=rotate(10)", multiplicity=1)
    x = torch.tensor([[[1.0], [0.0], [0.0]]]).repeat(500, 1, 1)  # (500, 3, 1): the x axis
    draws = RoundRandomness(3).augmentation_draws(0, torch.arange(500), copies=1, width=3, num_examples=500)
    cosines = aug.apply({"acc": x}, draws)["acc"][:, 0, 0]
    assert cosines.min() >= torch.cos(torch.deg2rad(torch.tensor(10.0))) - 1e-6


def test_draws_are_per_record_secret_and_fresh():
    # a record's draws do not depend on the batch it is in, nor on the dataset's other records
    r = RoundRandomness(11)
    whole = r.augmentation_draws(5, torch.arange(30), copies=4, width=3, num_examples=30)
    part = r.augmentation_draws(5, torch.tensor([3, 17]), copies=4, width=3, num_examples=31)
    torch.testing.assert_close(part, whole[[3, 17]])
    fresh = RoundRandomness().augmentation_draws(5, torch.arange(30), copies=4, width=3, num_examples=30)
    assert not torch.equal(fresh, whole)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_a_records_gradient_is_the_mean_over_its_copies_before_clipping(mode):
    # Prepare: no noise, a clipping norm no gradient reaches, lr 1, no momentum: the step moves the parameters by
    # minus the sum over records of their per-record gradients, over the expected batch
    aug = parse_augmentations("acc+gyro=rotate(90)", multiplicity=3)
    data, key, n = records(6), 99, 6
    torch.manual_seed(0)
    model = MultimodalModel(SCHEMA, ModelConfig("concat", 8, 8))
    reference_model = MultimodalModel(SCHEMA, ModelConfig("concat", 8, 8))
    reference_model.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    private = private_training(
        model,
        n,
        accountant="prv",
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        batch_size=n,
        lr=1.0,
        momentum=0.0,
        grad_sample_mode=mode,
        randomness=RoundRandomness(key),
        sample_rate=1.0,
        steps_per_epoch=1,
        expected_batch_size=float(n),
    )
    # Execute
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            dp_step(private, data, torch.arange(n), modality_dropout=0.0, step=0, augmentation=aug)
    finally:
        private.close()
    # Assert: the same as sum_records mean_copies grad(loss(copy)) / n, computed with plain autograd
    draws = RoundRandomness(key).augmentation_draws(0, torch.arange(n), copies=3, width=aug.width, num_examples=n)
    copies = aug.apply(data.inputs, draws)
    logits = reference_model(copies, data.mask.repeat_interleave(3, 0))
    loss = torch.nn.functional.cross_entropy(logits, data.labels.repeat_interleave(3), reduction="sum") / 3 / n
    loss.backward()
    for name, p in reference_model.named_parameters():
        torch.testing.assert_close(before[name] - model.state_dict()[name], p.grad, atol=1e-5, rtol=1e-4)


def test_bad_settings_are_refused_with_what_to_write():
    with pytest.raises(ConfigError, match="unknown augmentation 'flip'"):
        parse_augmentations("acc=flip")
    with pytest.raises(ConfigError, match=r"must lie in \(0, 180\]"):
        parse_augmentations("acc=rotate(0)")
    with pytest.raises(ConfigError, match="modality 'acc' is in two groups"):
        parse_augmentations("acc=rotate(5);acc+gyro=rotate(5)")
    with pytest.raises(ConfigError, match="multiplicity > 1 needs train.augmentations"):
        parse_augmentations("", multiplicity=4)
    with pytest.raises(ConfigError, match="expected 'modality\\+modality=augmentation"):
        parse_run_config({"train.augmentations": "rotate(15)"})
    with pytest.raises(ConfigError, match="train.multiplicity"):
        parse_run_config({"train.multiplicity": 0})


def test_a_wrong_modality_kind_is_refused_before_any_data_is_touched():
    data, model = records(20), MultimodalModel(SCHEMA, ModelConfig("concat", 8, 8))
    before, history = {k: v.clone() for k, v in model.state_dict().items()}, PrivacyHistory()
    training = LocalTraining(local_epochs=1, batch_size=10, augmentation=parse_augmentations("tab=rotate(15)", 2))
    with pytest.raises(ConfigError, match="'tab' is a tabular of shape \\[4\\]"):
        train_round(model, data, history, dp=DPRequest(4.0, 1e-5, 1.0, planned_rounds=1), training=training)
    assert history.entries == [] and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_the_run_config_reaches_the_round():
    config = parse_run_config({"train.augmentations": "acc+gyro=rotate(15)", "train.multiplicity": 4})
    training = local_training(config.train)
    assert training.augmentation.multiplicity == 4 and training.augmentation.groups[0].modalities == ("acc", "gyro")
    result = train_round(
        MultimodalModel(SCHEMA, ModelConfig("concat", 8, 8)),
        records(40),
        PrivacyHistory(),
        dp=DPRequest(4.0, 1e-5, 1.0, planned_rounds=1),
        training=training,
    )
    assert result.private and result.steps == 1
