"""Per-record input transforms: exact values, one record at a time, clear errors, the same in every model."""

import math

import pytest
import torch

from common.config import parse_run_config
from common.data.samples import MultimodalData
from common.data.schema import DatasetSchema, ModalitySpec
from common.errors import ConfigError
from common.model.multimodal import ModelConfig, MultimodalModel
from common.model.transforms import RecordTransform, check_modalities, parse_transforms
from common.privacy.accounting import PrivacyHistory
from common.privacy.training import DPRequest, LocalTraining, train_round

ACC = ModalitySpec("acc", "signal", (3, 128))
SCHEMA = DatasetSchema((ACC, ModalitySpec("gyro", "signal", (3, 128)), ModalitySpec("tab", "tabular", (4,))), ("a", "b"))


def chain(text: str, spec: ModalitySpec = ACC) -> RecordTransform:
    return RecordTransform(spec, parse_transforms(text)[spec.name])


def test_gravity_splits_a_constant_from_fast_motion_and_sums_back_exactly():
    # Prepare: gravity (0, 0, 1 g) plus a 5 Hz body oscillation at 50 Hz (0.1 cycles per sample)
    t = torch.arange(128, dtype=torch.float32)
    body = 0.3 * torch.sin(2 * math.pi * 0.1 * t)
    x = torch.stack([body, torch.zeros(128), torch.ones(128) + body]).unsqueeze(0)  # (1, 3, 128)
    # Execute
    out = chain("acc=gravity")(x)
    # Assert: 6 channels, gravity then body; they sum back to the input; away from the edges the low-pass keeps
    # the constant and drops the oscillation
    assert out.shape == (1, 6, 128)
    torch.testing.assert_close(out[:, :3] + out[:, 3:], x)
    middle = slice(32, 96)
    assert (out[0, 2, middle] - 1).abs().max() < 0.05 and out[0, 0, middle].abs().max() < 0.05
    assert (out[0, 3, middle] - body[middle]).abs().max() < 0.05


def test_magnitude_appends_the_norm_of_each_three_axis_group():
    x = torch.tensor([[3.0, 0.0], [4.0, 1.0], [0.0, 0.0]]).unsqueeze(0)  # (1, 3, 2)
    out = chain("acc=magnitude", ModalitySpec("acc", "signal", (3, 2)))(x)
    assert out.shape == (1, 4, 2)
    torch.testing.assert_close(out[0, 3], torch.tensor([5.0, 1.0]))
    # after a gravity split, one magnitude per sensor triple: gravity's and the body's
    assert chain("acc=gravity+magnitude").output.shape == (8, 128)


def test_scale_is_a_fixed_unit_change():
    out = chain("tab=scale(9.81)", SCHEMA["tab"])(torch.ones(2, 4))
    torch.testing.assert_close(out, torch.full((2, 4), 9.81))


@pytest.mark.parametrize("text", ["acc=gravity+magnitude", "acc=gravity(0.02)+scale(2)+magnitude"])
def test_a_record_is_transformed_alone_whatever_else_is_in_the_batch(text):
    # Prepare: two batches sharing record 0 and differing in every other record
    g = torch.Generator().manual_seed(0)
    first = torch.randn(5, 3, 128, generator=g)
    second = torch.cat([first[:1], 100 * torch.randn(4, 3, 128, generator=g)])
    transform = chain(text)
    # Execute / Assert: record 0's output is the same, and the same as alone (no statistic over records)
    torch.testing.assert_close(transform(first)[0], transform(second)[0])
    torch.testing.assert_close(transform(first[:1])[0], transform(first)[0])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("acc=lowpass", "unknown transform 'lowpass' for modality 'acc'; known: gravity, magnitude, scale"),
        ("acc", "expected 'modality=transform+transform'"),
        ("acc=scale", "'scale' for modality 'acc' needs a number"),
        ("acc=magnitude(2)", "'magnitude' for modality 'acc' takes no number"),
        ("acc=gravity(0.7)", "must lie in (0, 0.5)"),
        ("acc=scale(x)", "'x' is not a number"),
        ("acc=magnitude;acc=gravity", "modality 'acc' is named twice"),
    ],
)
def test_malformed_chains_are_refused_with_what_to_write(text, fragment):
    with pytest.raises(ConfigError) as err:
        parse_transforms(text)
    assert fragment in str(err.value)


def test_wrong_kinds_shapes_and_modalities_are_refused_before_any_data():
    with pytest.raises(ConfigError, match="'gravity' applies to signal modalities; 'tab' is of kind 'tabular'"):
        MultimodalModel(SCHEMA, ModelConfig(transforms="tab=gravity"))
    with pytest.raises(ConfigError, match="'magnitude' needs 3-axis channels .* 'sig' has 4 here"):
        chain("sig=magnitude", ModalitySpec("sig", "signal", (4, 16)))
    with pytest.raises(ConfigError, match=r"does not have: \['accel'\]; its modalities are \['acc', 'gyro'\]"):
        check_modalities(parse_transforms("accel=magnitude"), ["acc", "gyro"])
    with pytest.raises(ConfigError, match="model.transforms: unknown transform 'grav'"):
        parse_run_config({"model.transforms": "acc=grav"})


def test_the_encoder_sees_the_transformed_record_and_a_private_round_trains():
    # Prepare: a model over acc (gravity + magnitudes: 8 channels) and gyro (magnitude: 4), tabular untouched
    config = ModelConfig("concat", 8, 8, "acc=gravity+magnitude;gyro=magnitude")
    model = MultimodalModel(SCHEMA, config)
    assert model.encoders["acc"].conv1.in_channels == 8 and model.encoders["gyro"].conv1.in_channels == 4
    # transforms hold no parameters: the state is the same size as for an untransformed 8- and 4-channel input
    assert not any("transform" in k for k in model.state_dict())
    g = torch.Generator().manual_seed(1)
    n = 120
    data = MultimodalData(
        SCHEMA,
        {
            "acc": torch.randn(n, 3, 128, generator=g),
            "gyro": torch.randn(n, 3, 128, generator=g),
            "tab": torch.randn(n, 4, generator=g),
        },
        torch.ones(n, 3, dtype=torch.bool),
        torch.randint(0, 2, (n,), generator=g),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute
    result = train_round(
        model,
        data,
        PrivacyHistory(),
        dp=DPRequest(4.0, 1e-5, 1.0, planned_rounds=1),
        training=LocalTraining(local_epochs=1, batch_size=40),
    )
    # Assert: trained privately; every encoder moved; a fresh model with the same config loads the state
    assert result.private and result.steps == 3
    assert all(not torch.equal(model.state_dict()[k], before[k]) for k in before if k.endswith("conv1.weight"))
    MultimodalModel(SCHEMA, config).load_state_dict(model.state_dict())
