"""Scenarios: a run configuration built from the defaults, a scenario file and ``--set`` overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from common.config import RunConfig, flatten, parse_run_config
from common.errors import ConfigError


def load_scenario(path: Path) -> dict[str, Any]:
    """A scenario file's run-config overrides (flat keys)."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"scenario file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario file {path} is not valid TOML: {exc}") from None
    table = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", doc)
    return flatten(table)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value (numbers, booleans, inf, quoted strings); bare words are strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, got '{text}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def build_config(scenario: Path | None, overrides: list[str]) -> dict[str, Any]:
    """Defaults, then the scenario, then --set overrides; validated (ConfigError names the bad key)."""
    flat = RunConfig().to_flat()
    if scenario is not None:
        flat.update(load_scenario(scenario))
    flat.update(dict(parse_override(o) for o in overrides))
    return parse_run_config(flat).to_flat()
