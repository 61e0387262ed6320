"""Encoders: each maps one modality's input to the shared embedding size.

Every layer is one Opacus computes per-sample gradients for (Conv1d/2d, Linear, Embedding,
LayerNorm, GroupNorm, Opacus's DPLSTM); there is no BatchNorm, which mixes samples and breaks per-sample clipping.
Sizes come from the modality's :class:`~common.data.schema.ModalitySpec`, never from constants.

The CNN encoders (image, signal) take two options from the run config: ``model.norm`` (:data:`NORMS`), a
per-sample normalisation after each convolution, and ``model.width``, their convolution channels (0 = the
encoder's own default). Per-sample gradients of both norms: every grad-sample mode (``flat``: its GroupNorm
and LayerNorm samplers; ``hooks``: Opacus's; ``functorch``), exact against a per-sample loop (tests/test_bench_dp.py).

Which encoder a modality gets is named by ``model.encoder.<modality>`` in the run config
(:func:`build_encoder`): nothing (the kind's default), a built-in name (:data:`BUILTINS`), or a factory
``"package.module:function"`` called as ``factory(spec, embed_dim)``. A factory is checked before it
touches data (``common/model/validation.py``).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

import torch
from opacus.layers import DPLSTM
from torch import nn

from common.data.schema import ModalitySpec
from common.errors import EncoderError

# model.norm: none | group (GroupNorm, GROUPS groups or fewer) | layer (LayerNorm over channels at each position).
# Both normalise each sample by its own statistics; BatchNorm (batch statistics) is never offered.
NORMS = ("none", "group", "layer")
GROUPS = 8


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, *positions), at every position of every sample (ConvNeXt's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, *P) -> (B, *P, C), normalised over C, and back. Contiguous again: Opacus's hooks-mode Conv2d
        # sampler gives wrong per-sample gradients for a channels-last input (tests/test_encoders.py caught it).
        return self.norm(x.movedim(1, -1)).movedim(-1, 1).contiguous()


def conv_norm(norm: str, channels: int) -> nn.Module:
    """The per-sample normalisation ``model.norm`` names, for a convolution's ``channels`` outputs."""
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, GROUPS), channels)
    if norm == "layer":
        return ChannelLayerNorm(channels)
    if norm == "none":
        return nn.Identity()
    raise EncoderError(f"model.norm = {norm!r}: must be one of {list(NORMS)}")


class ImageEncoder(nn.Module):
    """Small CNN: two stride-2 convolutions (each followed by ``norm``), pooling to a coarse 3x3 grid (keeps where
    things are), projection."""

    def __init__(self, spec: ModalitySpec, embed_dim: int, width: int = 16, grid: int = 3, norm: str = "none"):
        super().__init__()
        channels = spec.shape[0]
        width = width or 16
        self.conv1 = nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1)
        self.norm1 = conv_norm(norm, width)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.norm2 = conv_norm(norm, 2 * width)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Linear(2 * width * grid * grid, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W)
        h = self.act(self.norm1(self.conv1(x)))  # (B, w, H/2, W/2)
        h = self.act(self.norm2(self.conv2(h)))  # (B, 2w, H/4, W/4)
        return self.proj(self.pool(h).flatten(1))  # (B, 2w*g*g) -> (B, D)


class SignalEncoder(nn.Module):
    """1-D CNN over time (sensor channels or audio features; two convolutions, each followed by ``norm``),
    pooling to a few time segments, projection."""

    def __init__(self, spec: ModalitySpec, embed_dim: int, width: int = 32, segments: int = 4, norm: str = "none"):
        super().__init__()
        channels = spec.shape[0]
        width = width or 32
        self.conv1 = nn.Conv1d(channels, width, kernel_size=5, stride=2, padding=2)
        self.norm1 = conv_norm(norm, width)
        self.conv2 = nn.Conv1d(width, width, kernel_size=5, stride=2, padding=2)
        self.norm2 = conv_norm(norm, width)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveAvgPool1d(segments)
        self.proj = nn.Linear(width * segments, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T)
        h = self.act(self.norm1(self.conv1(x)))  # (B, w, T/2)
        h = self.act(self.norm2(self.conv2(h)))  # (B, w, T/4)
        return self.proj(self.pool(h).flatten(1))  # (B, w*s) -> (B, D)


class TabularEncoder(nn.Module):
    """Two-layer MLP over a feature vector."""

    def __init__(self, spec: ModalitySpec, embed_dim: int, width: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(spec.shape[0], width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, F)
        return self.fc2(self.act(self.fc1(x)))  # (B, D)


class TextEncoder(nn.Module):
    """Token embedding, mean over non-padding tokens (id 0 is padding), projection."""

    def __init__(self, spec: ModalitySpec, embed_dim: int):
        super().__init__()
        assert spec.vocab_size is not None
        self.embed = nn.Embedding(spec.vocab_size, embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (B, L) int64
        keep = (tokens != 0).unsqueeze(-1).to(torch.float32)  # (B, L, 1)
        e = self.embed(tokens) * keep  # (B, L, D)
        pooled = e.sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # (B, D)
        return self.proj(pooled)  # (B, D)


class LSTMSignalEncoder(nn.Module):
    """Recurrent signal encoder: Opacus's DPLSTM over time (at most ``max_steps`` steps, by averaging
    neighbouring samples), its last hidden state and its mean over time, projection.

    Per-sample gradients: Opacus's ``hooks`` (or ``functorch``) grad-sample mode; fedfuse's ``flat`` mode
    has no sampler for DPLSTM's per-time-step linear layers and refuses it.
    """

    def __init__(self, spec: ModalitySpec, embed_dim: int, hidden: int = 32, max_steps: int = 32):
        super().__init__()
        channels, length = spec.shape
        self.pool = nn.AdaptiveAvgPool1d(min(length, max_steps))
        self.lstm = DPLSTM(channels, hidden, batch_first=True)
        self.proj = nn.Linear(2 * hidden, embed_dim)
        # DPLSTM's parameters have two names each (nn.LSTM's and its cells'); Opacus drops the cells' names from
        # a state_dict only when the DPLSTM is the top module. Keep nn.LSTM's names alone here too, so that saved
        # states, shared encoders and warm-start files hold each parameter once.
        self._register_state_dict_hook(_drop_lstm_aliases)
        self._register_load_state_dict_pre_hook(_add_lstm_aliases, with_module=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T)
        h, _ = self.lstm(self.pool(x).transpose(1, 2))  # (B, T', C) -> (B, T', H)
        return self.proj(torch.cat([h[:, -1], h.mean(dim=1)], dim=1))  # (B, 2H) -> (B, D)


def _drop_lstm_aliases(module: LSTMSignalEncoder, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for old in module.lstm.old_to_new:
        state_dict.pop(f"{prefix}lstm.{old}", None)


def _add_lstm_aliases(module: LSTMSignalEncoder, state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
    for old, new in module.lstm.old_to_new.items():
        if f"{prefix}lstm.{new}" in state_dict:
            state_dict.setdefault(f"{prefix}lstm.{old}", state_dict[f"{prefix}lstm.{new}"])


class _TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP block over one sample's tokens, padding masked (Linear and LayerNorm only)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.act = nn.GELU()

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # h: (B, L, W); keep: (B, L) bool, False at padding
        b, length, width = h.shape
        hs = width // self.heads
        q, k, v = self.qkv(self.norm1(h)).view(b, length, 3, self.heads, hs).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hs)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, L, L): within one sample only
        # A large finite value, not -inf: an all-padding (zero-filled, absent) sample stays finite.
        scores = scores.masked_fill(~keep[:, None, None, :], -1e9)
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, length, width)  # (B, L, W)
        h = h + self.out(y)
        return h + self.fc2(self.act(self.fc1(self.norm2(h))))  # (B, L, W)


class TransformerTextEncoder(nn.Module):
    """Small transformer over token ids (0 = padding): token + position embeddings, ``layers`` pre-norm
    blocks of masked self-attention, mean over non-padding tokens, projection.

    Built from Embedding, Linear and LayerNorm only, so every grad-sample mode computes its per-sample
    gradients: ``flat`` (the default), ``hooks`` and ``functorch``.
    """

    def __init__(self, spec: ModalitySpec, embed_dim: int, width: int = 32, heads: int = 2, layers: int = 1):
        super().__init__()
        assert spec.vocab_size is not None
        self.tokens = nn.Embedding(spec.vocab_size, width)
        self.positions = nn.Embedding(spec.shape[0], width)
        self.blocks = nn.ModuleList(_TransformerBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (B, L) int64
        b, length = tokens.shape
        keep = tokens != 0  # (B, L)
        positions = torch.arange(length, device=tokens.device).expand(b, length)  # (B, L): batch-first for DP
        h = self.tokens(tokens) + self.positions(positions)  # (B, L, W)
        for block in self.blocks:
            h = block(h, keep)
        weights = keep.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        pooled = (self.norm(h) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, W)
        return self.proj(pooled)  # (B, D)


EncoderFactory = Callable[[ModalitySpec, int], nn.Module]

# The kind's default encoder (``model.encoder.<modality>`` unset or "default").
ENCODERS: dict[str, EncoderFactory] = {
    "image": ImageEncoder,
    "signal": SignalEncoder,
    "tabular": TabularEncoder,
    "text": TextEncoder,
}

# Built-in encoders by name: (the kind they take, the class).
BUILTINS: dict[str, tuple[str, EncoderFactory]] = {
    "cnn": ("image", ImageEncoder),
    "conv1d": ("signal", SignalEncoder),
    "lstm": ("signal", LSTMSignalEncoder),
    "mlp": ("tabular", TabularEncoder),
    "bag-of-tokens": ("text", TextEncoder),
    "transformer": ("text", TransformerTextEncoder),
}
DEFAULT = "default"

_FACTORY_REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def is_factory_ref(choice: str) -> bool:
    """Whether ``choice`` names a factory (``package.module:function``) rather than a built-in."""
    return ":" in choice


def check_choice(modality: str, choice: str) -> None:
    """Refuse a malformed ``model.encoder.<modality>`` value (the form only: nothing is imported)."""
    if choice == DEFAULT or choice in BUILTINS:
        return
    if not is_factory_ref(choice):
        raise EncoderError(
            f"model.encoder.{modality} = {choice!r}: not a built-in encoder ({[DEFAULT, *BUILTINS]}) "
            'nor a factory "package.module:function"'
        )
    if not _FACTORY_REF.match(choice):
        raise EncoderError(
            f'model.encoder.{modality} = {choice!r}: a factory is named "package.module:function" '
            "(dotted module path, one colon, a function name)"
        )


def load_factory(choice: str) -> EncoderFactory:
    """Import the factory ``"package.module:function"`` (this runs the module's code: check the allowlist first)."""
    module_name, _, attr = choice.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (any import failure is the factory's problem, reported as such)
        raise EncoderError(
            f"encoder factory {choice!r}: cannot import module '{module_name}' "
            f"({type(exc).__name__}: {exc}); is it installed where fedfuse runs?"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise EncoderError(f"encoder factory {choice!r}: module '{module_name}' has no callable '{attr}'")
    return factory


def encoder_factory(spec: ModalitySpec, choice: str = DEFAULT) -> EncoderFactory:
    """The factory ``choice`` names for ``spec`` (a built-in must take its kind)."""
    if choice == DEFAULT:
        return ENCODERS[spec.kind]
    check_choice(spec.name, choice)
    if choice in BUILTINS:
        kind, factory = BUILTINS[choice]
        if kind != spec.kind:
            raise EncoderError(
                f"model.encoder.{spec.name} = {choice!r}: the built-in '{choice}' encodes kind "
                f"'{kind}', but modality '{spec.name}' is of kind '{spec.kind}'"
            )
        return factory
    return load_factory(choice)


def build_encoder(spec: ModalitySpec, embed_dim: int, choice: str = DEFAULT, *, norm: str = "none", width: int = 0) -> nn.Module:
    """The encoder ``choice`` names for ``spec`` (default: its kind's), mapping (B, *spec.shape) to (B, embed_dim).

    ``norm`` and ``width`` (``model.norm``, ``model.width``; 0 = the encoder's default) shape the built-in CNN
    encoders (:class:`ImageEncoder`, :class:`SignalEncoder`) only; other encoders and factories keep their own."""
    factory = encoder_factory(spec, choice)
    module: object
    if factory is ImageEncoder or factory is SignalEncoder:
        module = factory(spec, embed_dim, width=width, norm=norm)
    else:
        module = factory(spec, embed_dim)
    if not isinstance(module, nn.Module):
        raise EncoderError(f"encoder factory {choice!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module
