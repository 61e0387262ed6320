"""Where a ClientApp's data, state and privacy policy come from: a simulated partition or a real site.

- Simulation (node config has ``partition-id``): the scenario's partition for that index; the state
  folder is ``<run output>/clients/<client id>``; the budget is the scenario's.
- Deployment (node config has ``data-dir``): the site folder named there, the state folder in
  ``state-dir``, the site's own policy ``max-epsilon`` / ``max-delta`` and its public declared
  training-set size ``num-train-examples`` (see README, Deploy).

The declared size, not the count of records, sets the mechanism (q, steps, sigma) and the aggregation
weight: in simulation the scenario's partition plan fixes it (public), in a deployment the site's IT
declares it (``fedfuse data validate`` prints the count to declare).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig, run_out_dir
from common.data.samples import MultimodalData
from common.errors import ConfigError

log = logging.getLogger(__name__)
NODE_KEYS = ("data-dir", "state-dir", "client-id", "max-epsilon", "max-delta", "num-train-examples", "allowed-encoders")
# The declared training-set size may differ from the records' count by at most this factor either way: the
# mechanism (q = batch / declared, steps) stays private whatever the count, but its expected batch drifts.
DECLARED_SIZE_FACTOR = 2.0


@dataclass(frozen=True, eq=False)
class SiteContext:
    """A client's view of itself for one message."""

    client_id: str
    index: int  # partition index in simulation, else 0 (seeds the initial encoder weights)
    train: MultimodalData
    test: MultimodalData | None
    state_dir: Path
    max_epsilon: float  # the site's policy: the most privacy loss it accepts for its whole history
    max_delta: float | None  # the largest delta it accepts (None: whatever the run asks)
    simulated: bool
    declared_examples: int  # public training-set size: sets q, steps, sigma and the aggregation weight

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.train.schema.names


def resolve_site(node_config: Mapping[str, Any], config: RunConfig, flower_run_id: int) -> SiteContext:
    """The site this ClientApp runs for, from its node config."""
    if "partition-id" in node_config:
        return _simulated(node_config, config, flower_run_id)
    if "data-dir" in node_config:
        return _deployed(node_config)
    raise ConfigError(
        "this SuperNode's node config names no data: set --node-config 'data-dir=\"/path/to/site\" "
        'state-dir="/path/to/state" max-epsilon=8.0\' (see README, Deploy)'
    )


def _simulated(node_config: Mapping[str, Any], config: RunConfig, flower_run_id: int) -> SiteContext:
    from common.data.partition import num_clients

    index, total = int(node_config["partition-id"]), int(node_config.get("num-partitions", 0))
    expected = num_clients(config)
    if total and total != expected:
        raise ConfigError(
            f"the simulation runs {total} SuperNodes but the scenario describes {expected} clients; run "
            f'`flwr run . --federation-config "num-supernodes={expected}"` or use `fedfuse simulate`'
        )
    part = _cached_partition(config, index)
    state = run_out_dir(config, flower_run_id) / "clients" / part.client_id
    # The partition plan is public (the run config): its training-set size is the declared size.
    return SiteContext(part.client_id, index, part.train, part.test, state, part.budget, None, True, len(part.train))


@functools.lru_cache(maxsize=64)
def _cached_partition(config: RunConfig, index: int):  # noqa: ANN202
    """A simulated client's partition, built once per process (Ray actors serve many messages)."""
    from common.data.partition import client_partition

    return client_partition(config, index)


_WARNED: set[tuple[str, int]] = set()  # (site folder, declared size) already warned about in this process


def _deployed(node_config: Mapping[str, Any]) -> SiteContext:
    from common.data.site_folders import load_site

    max_epsilon, max_delta = site_policy(node_config)
    site = load_site(Path(str(node_config["data-dir"])).expanduser())
    train = site.part("train")
    if train is None:
        raise ConfigError(f"site folder {site.path} has no 'train' samples")
    client_id = str(node_config.get("client-id") or site.name)
    state = Path(str(node_config["state-dir"])).expanduser()
    declared = declared_size(node_config)
    problem = declared_size_problem(declared, len(train))
    if problem is not None and (str(site.path), declared) not in _WARNED:
        # logged at the site only, once per process: a refusal here would reach the server, a function of the count
        _WARNED.add((str(site.path), declared))
        log.warning("%s (training goes on: the mechanism is private whatever the count)", problem)
    return SiteContext(client_id, 0, train, site.part("test"), state, max_epsilon, max_delta, False, declared)


def site_policy(node_config: Mapping[str, Any]) -> tuple[float, float | None]:
    """A deployed site's node config checked: its policy ``(max-epsilon, max-delta)``; ConfigError naming a bad key."""
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise ConfigError(f"unknown node config key(s) {unknown}; known: {list(NODE_KEYS)}")
    for key in ("data-dir", "state-dir", "max-epsilon"):
        if key not in node_config:
            raise ConfigError(f"node config key '{key}' is required for a deployed site (see README, Deploy)")
    max_epsilon = node_config["max-epsilon"]
    if isinstance(max_epsilon, str) and max_epsilon.strip().lower() in ("inf", "infinity"):
        max_epsilon = math.inf
    if not isinstance(max_epsilon, (int, float)) or isinstance(max_epsilon, bool) or not max_epsilon > 0:
        raise ConfigError(f"node config key 'max-epsilon' must be a number > 0, got {max_epsilon!r}")
    max_delta = node_config.get("max-delta")
    if max_delta is not None and not (isinstance(max_delta, float) and 0 < max_delta < 1):
        raise ConfigError(f"node config key 'max-delta' must lie in (0, 1), got {max_delta!r}")
    return float(max_epsilon), max_delta


def declared_examples(node_config: Mapping[str, Any], count: int) -> int:
    """The site's public training-set size ``num-train-examples``, checked against the records' ``count``:
    ConfigError if it is missing, invalid or far off.

    For local checks only (``fedfuse site supernode``'s start check, whose report stays at the site): a message
    handler must not refuse on the count, since its error reaches the server (see :func:`declared_size_problem`).
    """
    declared = declared_size(node_config)
    problem = declared_size_problem(declared, count)
    if problem is not None:
        raise ConfigError(problem)
    return declared


def declared_size(node_config: Mapping[str, Any]) -> int:
    """The site's declared training-set size ``num-train-examples``; ConfigError if it is missing or invalid
    (a check of the node config alone, independent of the records)."""
    declared = node_config.get("num-train-examples")
    if declared is None:
        raise ConfigError(
            "node config key 'num-train-examples' is required for a deployed site: the public training-set size "
            "that sets the DP mechanism (sampling rate, steps, noise) and the aggregation weight. Run "
            "`fedfuse data validate DATA_DIR` to see the count to declare (see README, Deploy)"
        )
    if not isinstance(declared, int) or isinstance(declared, bool) or declared < 1:
        raise ConfigError(f"node config key 'num-train-examples' must be a positive integer, got {declared!r}")
    return declared


def declared_size_problem(declared: int, count: int) -> str | None:
    """What is wrong when the declared size is more than DECLARED_SIZE_FACTOR off the records' ``count`` (None if
    not). A function of the count: for the site's eyes only (its start check, its log), never a reply."""
    if declared / DECLARED_SIZE_FACTOR <= count <= declared * DECLARED_SIZE_FACTOR:
        return None
    return (
        f"node config key 'num-train-examples' = {declared} is far from the site folder's training split "
        f"(more than {DECLARED_SIZE_FACTOR:g}x off either way); run `fedfuse data validate DATA_DIR` and "
        "declare its count"
    )
