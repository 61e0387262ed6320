"""Encoders: one per kind, sized by the schema, and Opacus-compatible (per-sample gradients)."""

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from common.data.schema import ModalitySpec
from common.errors import EncoderError
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


CNN_SPECS = [s for s in SPECS if s.kind in ("image", "signal")]


@pytest.mark.parametrize("spec", CNN_SPECS, ids=lambda s: s.kind)
def test_norm_none_and_width_0_keep_the_default_encoder(spec):
    # Prepare: the encoder as it was before model.norm / model.width existed (no options)
    torch.manual_seed(0)
    plain = build_encoder(spec, embed_dim=8)
    torch.manual_seed(0)
    explicit = build_encoder(spec, embed_dim=8, norm="none", width=0)
    # Assert: the same parameters, initialised the same (so existing figures and checkpoints stay valid)
    assert plain.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in plain.state_dict().items())
    assert plain.conv1.out_channels == {"image": 16, "signal": 32}[spec.kind]


@pytest.mark.parametrize("spec", CNN_SPECS, ids=lambda s: s.kind)
@pytest.mark.parametrize("norm, layer", [("group", nn.GroupNorm), ("layer", nn.LayerNorm)])
def test_norm_puts_a_per_sample_normalisation_after_each_convolution(spec, norm, layer):
    # Prepare
    enc = build_encoder(spec, embed_dim=8, norm=norm, width=12)
    x = example(spec, 5)
    # Execute: sample 0 alone, and in a batch whose other samples are scaled far away
    alone = enc(x[:1])
    x[1:] *= 100.0
    together = enc(x)
    # Assert: two norm layers of the width asked for, no BatchNorm, each sample normalised by its own statistics
    norms = [m for m in enc.modules() if isinstance(m, layer)]
    assert len(norms) == 2
    assert enc.conv1.out_channels == 12
    assert ModuleValidator.validate(enc, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    # The normalisation really acts: a sample scaled by 100 (bias aside) gives nearly the same embedding
    plain = build_encoder(spec, embed_dim=8, width=12)
    plain.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("norm")}, strict=False)
    assert (enc(x[:1] * 100) - enc(x[:1])).abs().max() < (plain(x[:1] * 100) - plain(x[:1])).abs().max()


def test_a_norm_fedfuse_does_not_offer_is_refused():
    with pytest.raises(EncoderError, match="model.norm = 'batch'"):
        build_encoder(SPECS[1], embed_dim=8, norm="batch")


@pytest.mark.parametrize("spec", CNN_SPECS, ids=lambda s: s.kind)
@pytest.mark.parametrize("norm", ["group", "layer"])
@pytest.mark.parametrize("functorch", [False, True], ids=["hooks", "functorch"])
def test_norm_encoders_have_exact_opacus_per_sample_gradients(spec, norm, functorch):
    # Prepare
    torch.manual_seed(0)
    enc = build_encoder(spec, embed_dim=8, norm=norm, width=8)
    gsm = GradSampleModule(enc, loss_reduction="sum", force_functorch=functorch)
    x = example(spec, 4)
    # Execute: Opacus's per-sample gradients (hooks: its GroupNorm / LayerNorm samplers) vs one backward per sample
    gsm(x).sum().backward()
    for i in range(4):
        ref = build_encoder(spec, embed_dim=8, norm=norm, width=8)
        ref.load_state_dict(enc.state_dict())
        ref(x[i : i + 1]).sum().backward()
        # Assert
        for (name, p), (_, q) in zip(enc.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5), name
