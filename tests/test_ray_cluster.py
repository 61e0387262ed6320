"""A simulation that joins a running Ray cluster: two nodes (two raylets) on 127.0.0.1. Slow."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from ray_node_app import NODES_FILE

from client.state import ClientState
from common.privacy.ledger import Ledger, verify_chain
from server.run_folder import RunFolder
from simulations import runner
from simulations.scenario import build_config

pytestmark = pytest.mark.slow

CLIENTS, ROUNDS = 4, 3
# Non-private (dp.epsilon = inf): such rounds draw their randomness from the run's seed, so two runs can be compared
# bit for bit; a DP round draws a secret key from the OS, and its runs never repeat.
SETTINGS = [
    f"num-server-rounds={ROUNDS}",
    f"data.num-clients={CLIENTS}",
    "data.samples-per-client=150",
    "dp.epsilon=inf",
    "min-clients=2",
    'encoders="federated"',
]


def simulate(out: Path, ray_address: str | None) -> dict:
    flat = build_config(None, SETTINGS + [f"out-dir={json.dumps(str(out))}"])
    runner.run(flat, num_clients=CLIENTS, out_dir=out, cpus_per_client=1.0, ray_address=ray_address)
    return json.loads((out / "results.json").read_text())


@pytest.mark.timeout(300)  # a driver that cannot reach the cluster retries for ever: fail (and stop the cluster)
def test_two_node_ray_cluster(tmp_path, monkeypatch):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Loopback only. On Linux, Ray takes "127.0.0.1" in an address (ray.init's, a node's) for this machine's
    # outward IP, which a GCS bound to 127.0.0.1 does not answer: the driver retried for ever. Ray's own
    # single-machine mode (as on macOS/Windows) keeps 127.0.0.1, here and in the processes the nodes start.
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)

    # Prepare: a head node and a second node, one CPU each, so each holds one client actor. Ray's folder is short
    # (its socket paths must stay under ~107 bytes), linked from this test's folder and removed in every outcome.
    monkeypatch.setattr(runner, "CLIENT_APP", "ray_node_app:app")  # fedfuse's ClientApp, noting each message's node
    ray_tmp = Path(tempfile.mkdtemp(prefix="ffrc-", dir="/tmp"))
    (tmp_path / "ray").symlink_to(ray_tmp)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = None
    try:
        for attempt in range(3):  # Ray gives a raylet 30 s to register: on a loaded machine, start again
            cluster = Cluster()
            try:
                cluster.add_node(**node)  # the head
                cluster.add_node(**node)
                break
            except Exception as exc:  # noqa: BLE001
                cluster.shutdown()
                cluster = None
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
        assert sum(1 for n in cluster.global_state.node_table() if n["Alive"]) == 2

        # Execute: the same simulation on the cluster, then on a Ray of this machine alone
        on_cluster = simulate(tmp_path / "cluster", cluster.gcs_address)
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    alone = simulate(tmp_path / "alone", None)

    # Assert: the clients' actors ran on both nodes, and some client ran on each (its state found on either)
    lines = [json.loads(x) for x in (tmp_path / "cluster" / NODES_FILE).read_text().splitlines()]
    train = [x for x in lines if x["type"] == "train"]
    assert len({x["node"] for x in lines}) == 2
    assert len(train) == CLIENTS * ROUNDS
    moved = {x["partition"] for x in train if len({y["node"] for y in train if y["partition"] == x["partition"]}) == 2}
    assert moved, "no client ran on both nodes"
    for client in sorted((tmp_path / "cluster" / "clients").iterdir()):
        entries = Ledger(client / "ledger.jsonl").entries()  # one unbroken chain, whichever node wrote each entry
        assert verify_chain(entries) == [] and [e["round"] for e in entries] == list(range(1, ROUNDS + 1))
        record = ClientState(client).load_record(
            client_id=client.name, modalities=tuple(entries[-1]["modalities"]), accountant="prv"
        )
        assert [r for _, r in record.rounds] == list(range(1, ROUNDS + 1))
    # ... and the results equal the one-node run's
    assert on_cluster["status"] == alone["status"] == "completed"
    for a, b in zip(on_cluster["rounds"], alone["rounds"], strict=True):
        assert a["train"]["trained"] == b["train"]["trained"]
        assert a["evaluate"]["pooled"]["accuracy"] == pytest.approx(b["evaluate"]["pooled"]["accuracy"], abs=1e-9)
        assert a["evaluate"]["pooled"]["loss"] == pytest.approx(b["evaluate"]["pooled"]["loss"], rel=1e-5)
    cluster_model = RunFolder(tmp_path / "cluster").load_checkpoint().global_state
    alone_model = RunFolder(tmp_path / "alone").load_checkpoint().global_state
    assert cluster_model.keys() == alone_model.keys()
    assert all(torch.allclose(cluster_model[k], alone_model[k], atol=1e-6) for k in cluster_model)
