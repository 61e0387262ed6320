"""Run the fedfuse Flower apps in Flower's simulation engine, in this process.

This does what Flower's own ``flwr-simulation`` process does once a run is submitted (load the
ServerApp and ClientApp by name from the app folder, fuse the run config with pyproject.toml's
defaults, run the Ray-backed simulation runtime), without a detached SuperLink that outlives the
run. ``flwr run .`` runs the very same apps through a SuperLink.

The app folder is written for each run from :mod:`common.config`'s defaults (:func:`write_app_dir`),
so an installed wheel simulates without a source checkout.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.logs import flower_worker_level
from common.offline import flower_environment

log = logging.getLogger("fedfuse.simulate")

SERVER_APP = "server.server_app:app"
CLIENT_APP = "client.client_app:app"
APP_PUBLISHER = "fedfuse"


def write_app_dir(folder: Path) -> Path:
    """Write a Flower app folder into ``folder``: a pyproject.toml naming the apps, with the run config's defaults.

    It is what ``[tool.flwr.app]`` in the checkout's pyproject.toml says, built from :class:`common.config.RunConfig`
    (a test keeps the two equal); the apps themselves are imported from the installed packages.
    """
    import tomli_w

    from common.config import RunConfig, unflatten

    app = {
        "publisher": APP_PUBLISHER,
        "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
        "config": unflatten(RunConfig().to_flat()),
    }
    doc = {"project": {"name": "fedfuse", "version": "0.0.0"}, "tool": {"flwr": {"app": app}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return folder


def offline_environment(out_dir: Path) -> dict[str, str]:
    """Flower and Ray settings for an offline, self-contained run whose files stay in ``out_dir``."""
    return flower_environment(out_dir / ".flwr") | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


# Where a run's Ray temp folder goes: a short path, as Ray's socket paths must stay under ~107 bytes
# (a TMPDIR or an output folder may be much longer).
RAY_TMP_ROOT = Path("/tmp")


def remove_ray_folders(out_dir: Path) -> None:
    """Remove the Ray temp folders of runs into ``out_dir`` (left behind when a run was killed)."""
    for folder in RAY_TMP_ROOT.glob(ray_tmp_prefix(out_dir) + "*"):
        shutil.rmtree(folder, ignore_errors=True)


def ray_tmp_prefix(out_dir: Path) -> str:
    """Name prefix of the run's Ray temp folder (short: Ray's socket paths must stay under ~107 bytes)."""
    return f"ffray-{hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:8]}-"


@contextmanager
def _environment(out_dir: Path, verbose: bool = False) -> Iterator[None]:
    """Set the offline settings and a Ray temp folder owned by this run; restore everything after."""
    # Ray's folder is short-named and removed after the run (and one left by a killed earlier run of the
    # same output folder is removed now).
    remove_ray_folders(out_dir)
    ray_tmp = Path(tempfile.mkdtemp(prefix=ray_tmp_prefix(out_dir), dir=RAY_TMP_ROOT))
    values = offline_environment(out_dir) | {"RAY_TMPDIR": str(ray_tmp), "FLWR_LOG_LEVEL": flower_worker_level(verbose)}
    # PYTHONPATH too: Flower's Ray backend sets it in this process and never restores it
    saved = {k: os.environ.get(k) for k in [*values, "PYTHONPATH"]}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(ray_tmp, ignore_errors=True)


# Flower 1.42's simulation engine feeds the clients' actors from a thread that, every 0.1 s, asks the LinkState
# for the next message of EVERY node (``vce_api.add_messages_to_queue``); each ask scans every stored message, so one
# pass costs nodes x messages in flight: with 1,000 clients and 50 messages delivered and awaiting replies, 155 ms of
# CPU a pass (0.1 ms asking only the nodes a message waits for, :func:`add_messages_to_queue`), so a core busy and
# the GIL held through every message phase (measured on the development machine, 2 cores, loaded). It also waits
# 0.01 s between passes, not 0.1 s: a message phase started 85-108 ms after the ServerApp pushed its messages, 8-11 ms
# now (`fedfuse bench round-overhead`, 10 clients, one at a time); a pass costs the messages stored, about 50 us.
PATCHED_FLOWER = "1.42.0"
FEED_INTERVAL = 0.01  # s between passes (Flower 1.42: 0.1)


def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict[int, int], f_stop: Any) -> None:
    """Flower 1.42's ``vce_api.add_messages_to_queue``, asking only the nodes that have an undelivered message.

    The same messages reach the queue in the same order (nodes in ``nodes_mapping`` order, one message per node a
    pass); a pass costs the messages stored plus the nodes that have one waiting, not every node."""
    while not f_stop.is_set():
        with state.lock:  # InMemoryLinkState's store: the messages not yet answered
            waiting = {m.metadata.dst_node_id for m in state.message_ins_store.values() if m.metadata.delivered_at == ""}
        for node_id in (n for n in nodes_mapping if n in waiting):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(FEED_INTERVAL)


@contextmanager
def _message_feed() -> Iterator[None]:
    """Use :func:`add_messages_to_queue` in Flower's simulation engine for one run (Flower 1.42 only)."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    if flwr.__version__ != PATCHED_FLOWER:  # another Flower: its own feed, as it is
        yield
        return
    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


RAY_START_ATTEMPTS = 3  # Ray gives a starting node 30 s to register (fixed in Ray): a loaded machine can miss that


def start_ray(init_args: dict[str, Any], *, attempts: int = RAY_START_ATTEMPTS) -> None:
    """Start (or join) Ray as Flower's Ray backend would, trying again when a node times out during its start-up.

    Flower's backend then finds Ray running and uses it. Without this, one slow start-up ended the simulation
    runtime while the ServerApp went on waiting for replies."""
    import ray

    # What Flower 1.42's RayBackend.init_ray does: the actors see this process's import path
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            log.warning(
                "Ray's node did not start within Ray's 30 s (a loaded machine); starting it again (%d/%d)", attempt, attempts
            )
            ray.shutdown()


def ray_init_args(*, ray_address: str | None, verbose: bool) -> dict[str, Any]:
    """``ray.init``'s arguments: a Ray of this machine's cores, or (``ray_address``) a running Ray cluster joined."""
    common = {"logging_level": "INFO" if verbose else "WARNING", "log_to_driver": True, "include_dashboard": False}
    if ray_address:  # the cluster's own resources: Ray refuses num_cpus when joining one
        return common | {"address": ray_address}
    return common | {"num_cpus": max(1, os.cpu_count() or 1)}


def run(
    flat_config: dict[str, Any],
    *,
    num_clients: int,
    out_dir: Path,
    cpus_per_client: float = 1.0,
    verbose: bool = False,
    ray_address: str | None = None,
) -> float:
    """Simulate ``num_clients`` SuperNodes running the fedfuse apps; return the wall time in seconds.

    ``ray_address``: join the running Ray cluster there (``ray start --head`` on one machine, ``ray start
    --address`` on the others) instead of starting a Ray of this machine's cores; the clients' Ray actors then run
    on every node, so the output folder (client state included) and any data folder must be at the same path on
    every node (shared storage)."""
    import ray
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    out_dir.mkdir(parents=True, exist_ok=True)
    # The same Run the simulation runtime builds for itself, plus our run config as the override.
    flwr_run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run_ = replace(
        Run.create_empty(flwr_run_id),
        override_config=dict(flat_config),
        primary_task_id=generate_rand_int_from_bytes(TASK_ID_NUM_BYTES),
        federation_id=NOOP_FEDERATION_ID,
    )
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, flwr_run_id, SUPERLINK_NODE_ID
    app_dir = write_app_dir(Path(tempfile.mkdtemp(prefix="fedfuse-app-")))
    fused = get_fused_config_from_dir(app_dir, run_.override_config)
    context = Context(run_id=flwr_run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)
    backend = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": ray_init_args(ray_address=ray_address, verbose=verbose),
    }
    start = time.perf_counter()
    with _environment(out_dir, verbose), _message_feed():
        try:
            start_ray(backend["init_args"])
            _run_simulation(
                num_supernodes=num_clients,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                server_app_attr=SERVER_APP,
                client_app_attr=CLIENT_APP,
                backend_name="ray",
                backend_config=backend,
                app_dir=str(app_dir),
                run=run_,
                server_app_context=context,
                verbose_logging=verbose,
                is_app=True,
            )
        finally:
            if ray.is_initialized():
                ray.shutdown()
            shutil.rmtree(app_dir, ignore_errors=True)
    return time.perf_counter() - start
