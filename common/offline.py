"""Flower offline and self-contained: no telemetry, no update check, no dependency installs at run time.

The one definition of these settings: the simulation runtime, the local deployment harness and the tests
take them from here (the Makefile exports the same three for the commands it runs).
"""

from __future__ import annotations

from pathlib import Path

OFFLINE_FLOWER = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never `uv sync` an app's dependencies at run time
}


def flower_environment(home: Path) -> dict[str, str]:
    """Environment variables for a Flower process that keeps its files in ``home`` and goes nowhere online."""
    return OFFLINE_FLOWER | {"FLWR_HOME": str(home)}
