"""Server optimisers: how the global blocks move towards the round's average.

- ``fedavg`` / ``fedprox``: take the average (FedProx's proximal term acts on the clients).
- ``fedadam`` (Reddi et al., 2021): treat ``average - global`` as a pseudo-gradient and take an
  Adam step with server learning rate ``server-lr``. Its moments are part of the checkpoint.
- ``fedyogi`` (same paper): as FedAdam, but the second moment moves additively,
  ``v -= (1 - beta2) * d^2 * sign(v - d^2)``, so it grows no faster than the squared pseudo-gradient and
  a few large noisy (DP) updates do not shrink the step for many rounds.
The server only post-processes the clients' DP outputs: no privacy cost.
Only blocks that some client trained this round move; the others keep their values.
"""

from __future__ import annotations

import torch

MOMENT_PREFIXES = ("opt.m.", "opt.v.")


class ServerOptimizer:
    """FedAvg: the new global value of a block is the clients' weighted average."""

    def step(self, current: dict[str, torch.Tensor], averages: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        new = dict(current)
        new.update({k: v.clone() for k, v in averages.items()})
        return new

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"fedavg has no optimiser state, got keys {sorted(state)[:3]}")


class FedAdam(ServerOptimizer):
    """Adam on the pseudo-gradient ``average - current`` (FedOpt)."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, current: dict[str, torch.Tensor], averages: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        new = dict(current)
        for key, avg in averages.items():
            if key not in current:  # a block seen for the first time starts at its average
                new[key] = avg.clone()
                continue
            delta = avg - current[key]
            m = self.beta1 * self.m.get(key, torch.zeros_like(delta)) + (1 - self.beta1) * delta
            v = self._second_moment(self.v.get(key, torch.zeros_like(delta)), delta)
            self.m[key], self.v[key] = m, v
            new[key] = current[key] + self.lr * m / (v.sqrt() + self.tau)
        return new

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta * delta

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"opt.m.{k}": v for k, v in self.m.items()}, **{f"opt.v.{k}": v for k, v in self.v.items()}}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.m = {k[len("opt.m.") :]: v for k, v in state.items() if k.startswith("opt.m.")}
        self.v = {k[len("opt.v.") :]: v for k, v in state.items() if k.startswith("opt.v.")}


class FedYogi(FedAdam):
    """Yogi on the pseudo-gradient ``average - current`` (FedOpt): an additive second-moment update."""

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        square = delta * delta
        return v - (1 - self.beta2) * square * torch.sign(v - square)


def build_optimizer(strategy: str, server_lr: float) -> ServerOptimizer:
    """The server optimiser of ``strategy`` (fedavg and fedprox average; fedadam, fedyogi take FedOpt steps)."""
    if strategy == "fedadam":
        return FedAdam(server_lr)
    if strategy == "fedyogi":
        return FedYogi(server_lr)
    return ServerOptimizer()
