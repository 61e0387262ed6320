"""Per-block weighted averaging: each parameter is averaged over the clients that sent it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Contribution:
    """One client's update: its shared parameters and its weight (number of training examples)."""

    arrays: dict[str, torch.Tensor]
    weight: float


def weighted_average(contributions: list[Contribution]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Average every key over the contributions that carry it, weighted; also return each key's total weight.

    A head block for modality m is averaged over the clients that hold m only, so clients without m
    neither dilute it nor pull it towards their (untrained) values.
    """
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for c in contributions:
        if c.weight <= 0:
            raise ValueError(f"weights must be positive, got {c.weight}")
        for key, value in c.arrays.items():
            v = value.detach().to(torch.float64)
            sums[key] = sums[key] + c.weight * v if key in sums else c.weight * v
            weights[key] = weights.get(key, 0.0) + c.weight
    averages = {k: (sums[k] / weights[k]).to(torch.float32) for k in sums}
    return averages, weights
