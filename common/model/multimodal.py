"""A client's model: its private encoders (one per modality it holds) and the shared fusion head."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from common.config import ModelConfig  # the run config's model section is the architecture: one definition
from common.data.schema import DatasetSchema
from common.errors import GlobalParametersError
from common.model.encoders import build_encoder
from common.model.fusion import build_head
from common.model.transforms import RecordTransform, parse_transforms

HEAD_PREFIX = "head."
ENCODER_PREFIX = "encoders."


class MultimodalModel(nn.Module):
    """Encoders for ``schema``'s modalities + a fusion head over the same modalities.

    Every encoder runs on every batch: inputs of absent modalities are zero-filled first and their
    embeddings are masked in the head. Skipping or freezing an encoder depending on the batch
    would make which parameters get DP noise depend on private data.
    """

    def __init__(self, schema: DatasetSchema, config: ModelConfig, *, seed: int | None = None):
        super().__init__()
        self.schema = schema
        self.config = config
        # Per-record input transforms (no parameters): the encoder of a transformed modality sees their output.
        chains = parse_transforms(config.transforms)
        self.transforms = {m.name: RecordTransform(m, chains[m.name]) for m in schema.modalities if m.name in chains}
        encoder_specs = [self.transforms[m.name].output if m.name in self.transforms else m for m in schema.modalities]
        # With a seed, each encoder's initial weights depend only on (seed, modality), so clients holding
        # different subsets still start a modality's encoder identically (needed to average encoders).
        self.encoders = nn.ModuleDict(
            {
                m.name: _seeded(
                    build_encoder,
                    seed,
                    m.name,
                    m,
                    config.embed_dim,
                    config.encoder_for(m.name),
                    norm=config.norm,
                    width=config.width,
                )
                for m in encoder_specs
            }
        )
        self.head = build_head(
            config.fusion,
            schema.names,
            embed_dim=config.embed_dim,
            num_classes=schema.num_classes,
            hidden_dim=config.hidden_dim,
        )

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        # inputs: name -> (B, *shape); mask: (B, M) bool in schema order
        return self.head(self.embed(inputs, mask), mask)  # (B, K)

    def embed(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Every encoder's embedding (B, M, D), absent inputs zero-filled first (the head masks them)."""
        embeddings = []
        for i, spec in enumerate(self.schema.modalities):
            name, x = spec.name, inputs[spec.name]
            if spec.scaling is not None:  # the schema's fixed, public (offset, scale): the same at every site
                x = (x - spec.scaling[0]) / spec.scaling[1]
            present = mask[:, i].view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(present, x, torch.zeros((), dtype=x.dtype))  # zero-fill absent
            if name in self.transforms:  # fixed functions of each record alone, the same everywhere
                x = self.transforms[name](x)  # (B, *shape) -> (B, *transformed shape)
            embeddings.append(self.encoders[name](x))  # (B, D)
        return torch.stack(embeddings, dim=1)  # (B, M, D)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The shared head's parameters, keyed ``head.<...>`` (what a client may send)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(HEAD_PREFIX)}

    def encoder_state(self, name: str) -> dict[str, torch.Tensor]:
        """One modality's encoder parameters, keyed ``encoders.<name>.<...>``."""
        prefix = f"{ENCODER_PREFIX}{name}."
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(prefix)}

    def load_partial(self, state: dict[str, torch.Tensor]) -> None:
        """Load the given keys (e.g. the global head); every key must exist with the same shape."""
        own = self.state_dict()
        for key, value in state.items():
            if key not in own:
                raise KeyError(f"parameter '{key}' does not exist in this model")
            if tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(f"parameter '{key}': expected shape {tuple(own[key].shape)}, got {tuple(value.shape)}")
        self.load_state_dict(state, strict=False)


MAX_GLOBAL_MAGNITUDE = 1e4  # no trained fedfuse parameter comes near this; beyond it a head can only make losses overflow


def check_global_parameters(model: MultimodalModel, received: dict[str, torch.Tensor], keys: list[str]) -> None:
    """Refuse the server's parameters unless they fit this client's model: fedfuse names, every shared head
    key present, the model's shapes, finite, and no value beyond :data:`MAX_GLOBAL_MAGNITUDE`.

    ``keys`` are the parameters this client shares (and so takes from the server). Called before any data
    is touched, so a malformed or hostile head never reaches the training data.
    """
    hint = "the server's model settings (model.fusion, model.embed-dim, model.hidden-dim, labels) must match the sites'"
    unknown = sorted(k for k in received if not k.startswith((HEAD_PREFIX, ENCODER_PREFIX)))
    if unknown:
        raise GlobalParametersError(f"the server sent parameters that are not part of a fedfuse model: {unknown[:3]}")
    missing = sorted(k for k in keys if k.startswith(HEAD_PREFIX) and k not in received)
    if missing:
        raise GlobalParametersError(
            f"the server's head lacks {len(missing)} of this client's parameters (first: '{missing[0]}'); {hint}"
        )
    own = model.state_dict()
    for key in keys:
        value = received.get(key)
        if value is None:  # an encoder the federation has no global value for yet
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            raise GlobalParametersError(
                f"the server's '{key}' has shape {tuple(value.shape)}, this client's model {tuple(own[key].shape)}; {hint}"
            )
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise GlobalParametersError(f"the server's '{key}' holds NaN or infinite values; refused before training")
        largest = float(value.abs().max()) if value.numel() else 0.0
        if largest > MAX_GLOBAL_MAGNITUDE:
            raise GlobalParametersError(
                f"the server's '{key}' holds values up to {largest:.3g}, beyond the "
                f"{MAX_GLOBAL_MAGNITUDE:g} that trained fedfuse parameters stay within; "
                "refused before training"
            )


def _seeded(factory, seed: int | None, name: str, *args, **kwargs):
    """``factory(*args, **kwargs)`` under a seed derived from (seed, name), without touching the global RNG."""
    if seed is None:
        return factory(*args, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big") >> 1)
        return factory(*args, **kwargs)


def global_head_template(
    modalities: list[str] | tuple[str, ...], num_classes: int, config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Initial parameters of the federation's head over all ``modalities`` (server side)."""
    head = build_head(
        config.fusion, modalities, embed_dim=config.embed_dim, num_classes=num_classes, hidden_dim=config.hidden_dim
    )
    return {HEAD_PREFIX + k: v.detach().clone() for k, v in head.state_dict().items()}
