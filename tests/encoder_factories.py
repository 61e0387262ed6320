"""Encoder factories for the bring-your-own-encoder tests: one valid, one per reason to refuse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.data.schema import ModalitySpec


class SmallSignalNet(nn.Module):
    """A valid custom encoder: Conv1d + GroupNorm + Linear, each sample on its own."""

    def __init__(self, spec: ModalitySpec, embed_dim: int):
        super().__init__()
        self.conv = nn.Conv1d(spec.shape[0], 8, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T)
        return self.proj(F.gelu(self.norm(self.conv(x))).mean(dim=2))  # (B, 8) -> (B, D)


def small_signal(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    return SmallSignalNet(spec, embed_dim)


def small_linear(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    """A valid encoder for any numeric kind that every grad-sample mode supports (flat included)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(spec.shape).prod()), embed_dim))


def batch_norm(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(spec.shape[0], 4, 3), nn.BatchNorm1d(4), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, embed_dim)
    )


def plain_lstm(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(spec.shape[0], embed_dim, batch_first=True)

        def forward(self, x):
            return self.lstm(x.transpose(1, 2))[0][:, -1]

    return Net()


def dropout(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(int(torch.tensor(spec.shape).prod()), embed_dim))


class _BatchCentred(nn.Module):
    """Subtracts the batch mean: sample i's output depends on every other sample."""

    def __init__(self, features: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(features, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        return h - h.mean(dim=0, keepdim=True)


def batch_mixing(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    return _BatchCentred(int(torch.tensor(spec.shape).prod()), embed_dim)


def wrong_size(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(spec.shape).prod()), embed_dim + 1))


class _UnitNorm(nn.Module):
    def __init__(self, features: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(features, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc(x / x.norm(dim=1, keepdim=True))  # 0 / 0 for a zero-filled (absent) input


def not_finite_when_absent(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    return _UnitNorm(int(torch.tensor(spec.shape).prod()), embed_dim)


class _SharedWeight(nn.Module):
    """Uses its layer's weight a second time outside the layer: per-sample gradient engines miss that use."""

    def __init__(self, features: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(features, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc(x) + F.linear(x, self.fc.weight)


def hidden_weight_use(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    return _SharedWeight(int(torch.tensor(spec.shape).prod()), embed_dim)


def not_a_module(spec: ModalitySpec, embed_dim: int):
    return lambda x: x


def raises(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    raise RuntimeError("this factory wants a kind 'image' modality")


NOT_CALLABLE = 3
