"""Encoders: one per kind, sized by the schema, and Opacus-compatible (per-sample gradients)."""

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator

from common.data.schema import ModalitySpec
from common.model.encoders import ENCODERS, build_encoder

SPECS = [
    ModalitySpec("img", "image", (3, 20, 16)),
    ModalitySpec("sig", "signal", (6, 50)),
    ModalitySpec("tab", "tabular", (7,)),
    ModalitySpec("txt", "text", (9,), "int64", vocab_size=30),
]


def example(spec, batch):
    if spec.kind == "text":
        return torch.randint(0, spec.vocab_size, (batch, *spec.shape))
    return torch.randn(batch, *spec.shape)


def test_every_kind_has_an_encoder():
    assert set(ENCODERS) == {"image", "signal", "tabular", "text"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_encoder_maps_schema_shape_to_embedding(spec):
    enc = build_encoder(spec, embed_dim=24)
    assert enc(example(spec, 5)).shape == (5, 24)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_encoder_is_opacus_compatible_with_exact_per_sample_gradients(spec):
    # Prepare
    torch.manual_seed(0)
    enc = build_encoder(spec, embed_dim=8)
    assert ModuleValidator.validate(enc, strict=False) == []
    gsm = GradSampleModule(enc, loss_reduction="sum")
    x = example(spec, 4)
    # Execute: per-sample gradients from Opacus vs. one backward pass per sample
    gsm(x).sum().backward()
    for i in range(4):
        enc.zero_grad()
        ref = build_encoder(spec, embed_dim=8)
        ref.load_state_dict(enc.state_dict())
        ref(x[i : i + 1]).sum().backward()
        # Assert
        for (name, p), (_, q) in zip(enc.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5), name
