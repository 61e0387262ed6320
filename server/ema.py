"""Exponential moving average of the global parameters across rounds (``ema-decay``).

After each round's aggregation the server updates, per parameter,

    ema_1 = theta_1,    ema_r = decay * ema_{r-1} + (1 - decay) * theta_r

where theta_r is the global model after round r. A parameter that first appears in a later round (a
modality's encoder first trained then, with ``encoders = "federated"``) starts at its value then.
The average is post-processing of the DP outputs (the aggregated updates), so it costs no privacy.
Clients always train from the raw global model theta_r; the EMA is what the run evaluates,
checkpoints as its served model and reports (results.json ``served_model``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ParameterEMA:
    """The moving average of a state dict, updated once per round."""

    def __init__(self, decay: float, state: Mapping[str, torch.Tensor] | None = None):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.state: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in (state or {}).items()}

    def update(self, current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold the round's global parameters ``current`` in; returns the new average (keys of ``current`` only)."""
        updated = {}
        for key, value in current.items():
            previous = self.state.get(key)
            if previous is None or previous.shape != value.shape or not value.is_floating_point():
                updated[key] = value.detach().clone()  # first seen (or not averageable): start from its value
            else:
                updated[key] = torch.lerp(value.detach(), previous, self.decay)  # decay*prev + (1-decay)*value
        self.state = updated
        return self.state
