"""Fusion head: any subset of modalities, output independent of absent modalities, per-modality blocks."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from common.data.schema import DatasetSchema, ModalitySpec
from common.model.fusion import FUSIONS, block_of, build_head
from common.model.multimodal import ModelConfig, MultimodalModel, global_head_template

SCHEMA = DatasetSchema(
    (
        ModalitySpec("image", "image", (1, 8, 8)),
        ModalitySpec("signal", "signal", (2, 16)),
        ModalitySpec("tabular", "tabular", (5,)),
        ModalitySpec("text", "text", (6,), "int64", vocab_size=20),
    ),
    ("a", "b", "c"),
)
MODELS = {f: MultimodalModel(SCHEMA, ModelConfig(fusion=f, embed_dim=8, hidden_dim=8)) for f in FUSIONS}
for _m in MODELS.values():
    _m.eval()


def random_inputs(gen, batch, scale=1.0):
    out = {}
    for spec in SCHEMA.modalities:
        if spec.kind == "text":
            out[spec.name] = torch.randint(0, spec.vocab_size, (batch, *spec.shape), generator=gen)
        else:
            out[spec.name] = scale * torch.randn((batch, *spec.shape), generator=gen)
    return out


@settings(max_examples=40, deadline=None)
@given(
    fusion=st.sampled_from(FUSIONS),
    present=st.lists(st.booleans(), min_size=4, max_size=4).filter(any),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 1e4),
)
def test_output_does_not_depend_on_absent_modalities(fusion, present, seed, scale):
    # Prepare: two inputs that agree on present modalities and differ arbitrarily on absent ones
    gen = torch.Generator().manual_seed(seed)
    a, b = random_inputs(gen, 3), random_inputs(gen, 3, scale)
    for spec, p in zip(SCHEMA.modalities, present):
        if p:
            b[spec.name] = a[spec.name].clone()
    mask = torch.tensor([present] * 3)
    # Execute
    with torch.no_grad():
        out_a, out_b = MODELS[fusion](a, mask), MODELS[fusion](b, mask)
    # Assert: bit-identical
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_sample_may_have_a_different_subset(fusion):
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    out = MODELS[fusion](random_inputs(gen, 4), mask)
    assert out.shape == (4, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_client_head_is_a_subset_of_the_global_head(fusion):
    config = ModelConfig(fusion=fusion, embed_dim=8, hidden_dim=8)
    client = MultimodalModel(SCHEMA.restrict(["signal", "text"]), config)
    global_head = global_head_template(list(SCHEMA.names), SCHEMA.num_classes, config)
    client_head = client.head_state()
    assert set(client_head) < set(global_head)
    assert all(client_head[k].shape == global_head[k].shape for k in client_head)
    # per-modality blocks only for the client's modalities
    assert {block_of(k[len("head.") :]) for k in client_head} - {None} == {"signal", "text"}


def test_unknown_fusion_is_rejected():
    with pytest.raises(ValueError, match="unknown fusion 'early'"):
        build_head("early", ["a"], embed_dim=4, num_classes=2, hidden_dim=4)
    with pytest.raises(ValueError, match="'model.fusion': must be one of"):
        ModelConfig(fusion="early")


def test_load_partial_checks_keys_and_shapes():
    model = MultimodalModel(SCHEMA.restrict(["tabular"]), ModelConfig(embed_dim=8, hidden_dim=8))
    with pytest.raises(KeyError, match="head.blocks.image.token.weight"):
        model.load_partial({"head.blocks.image.token.weight": torch.zeros(8, 8)})
    with pytest.raises(ValueError, match="expected shape"):
        model.load_partial({"head.core.classifier.bias": torch.zeros(4)})
    model.load_partial({"head.core.classifier.bias": torch.ones(3)})
    assert torch.equal(model.head_state()["head.core.classifier.bias"], torch.ones(3))


def test_a_seed_fixes_each_encoders_start_whatever_the_other_modalities():
    config = ModelConfig(embed_dim=8, hidden_dim=8)
    a = MultimodalModel(SCHEMA.restrict(["image", "signal"]), config, seed=3)
    b = MultimodalModel(SCHEMA.restrict(["signal", "tabular"]), config, seed=3)
    c = MultimodalModel(SCHEMA.restrict(["signal"]), config, seed=4)
    sa, sb, sc = a.encoder_state("signal"), b.encoder_state("signal"), c.encoder_state("signal")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
