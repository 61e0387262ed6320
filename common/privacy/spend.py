"""How fedfuse writes a privacy spend, everywhere it prints one: ``(ε = 2.31, δ = 1e-05)``."""

from __future__ import annotations

import math


def format_spend(epsilon: float | None, delta: float | None) -> str:
    """Privacy spend as ``(ε = 2.31, δ = 1e-05)``; non-private (no finite ε: JSON null or ∞) as ``(ε = ∞, non-private)``."""
    if epsilon is None or not math.isfinite(epsilon):
        return "(ε = ∞, non-private)"
    return f"(ε = {epsilon:.2f}, δ = {delta:g})" if delta is not None else f"(ε = {epsilon:.2f})"
