"""Per-kind encoders: each maps one modality's input to the shared embedding size.

Every layer is one Opacus computes per-sample gradients for (Conv1d/2d, Linear, Embedding,
LayerNorm); there is no BatchNorm, which mixes samples and breaks per-sample clipping.
Sizes come from the modality's :class:`~common.data.schema.ModalitySpec`, never from constants.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from common.data.schema import ModalitySpec


class ImageEncoder(nn.Module):
    """Small CNN: two stride-2 convolutions, pooling to a coarse 3x3 grid (keeps where things are), projection."""

    def __init__(self, spec: ModalitySpec, embed_dim: int, width: int = 16, grid: int = 3):
        super().__init__()
        channels = spec.shape[0]
        self.conv1 = nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Linear(2 * width * grid * grid, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W)
        h = self.act(self.conv1(x))  # (B, w, H/2, W/2)
        h = self.act(self.conv2(h))  # (B, 2w, H/4, W/4)
        return self.proj(self.pool(h).flatten(1))  # (B, 2w*g*g) -> (B, D)


class SignalEncoder(nn.Module):
    """1-D CNN over time (sensor channels or audio features), pooling to a few time segments, projection."""

    def __init__(self, spec: ModalitySpec, embed_dim: int, width: int = 32, segments: int = 4):
        super().__init__()
        channels = spec.shape[0]
        self.conv1 = nn.Conv1d(channels, width, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(width, width, kernel_size=5, stride=2, padding=2)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveAvgPool1d(segments)
        self.proj = nn.Linear(width * segments, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T)
        h = self.act(self.conv1(x))  # (B, w, T/2)
        h = self.act(self.conv2(h))  # (B, w, T/4)
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


ENCODERS: dict[str, Callable[[ModalitySpec, int], nn.Module]] = {
    "image": ImageEncoder,
    "signal": SignalEncoder,
    "tabular": TabularEncoder,
    "text": TextEncoder,
}


def build_encoder(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    """The encoder for ``spec``'s kind, mapping (B, *spec.shape) to (B, embed_dim)."""
    return ENCODERS[spec.kind](spec, embed_dim)
