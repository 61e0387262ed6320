"""Deployment: the ServerApp's grid (fast), then real processes on loopback (slow): a SuperLink with TLS and
SuperNode authentication, three sites holding different modalities, each behind the warm executor.

The slow tests share one deployment and run in file order; each run asks for a larger epsilon than the one
before it (a site's budget covers its whole history), so any subset of them also runs in this order.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from common import messages as M
from common.certs import make_credentials
from common.config import RunConfig, parse_run_config
from common.model.multimodal import ModelConfig, global_head_template
from common.privacy.ledger import load_public_key_hex
from server.grid import (
    POLL_INTERVAL,
    PULL_SHARE,
    SIMULATION_POLL_INTERVAL,
    NodesUnavailableError,
    PollingGrid,
    sample_nodes,
)
from server.run_folder import RunFolder
from server.strategy import FedFuse, RunState
from simulations.deployment import BIN, DEFAULT_SITES, deployment, leftover_processes, write_sites

POLICY = {"site-1": 8.0, "site-2": 8.0, "site-3": 5.0}  # site-3 accepts at most epsilon = 5 over its whole history


# --- the ServerApp's grid, with a fake Flower grid -----------------------------------------------------
class ScriptedGrid:
    """A Flower grid whose nodes answer after a scripted number of pulls (None: never)."""

    pull_interval = 0.01

    def __init__(self, answers_after: dict[int, int | None], nodes=(1, 2, 3)):
        self.answers_after, self.nodes, self.pulls, self.sent = answers_after, list(nodes), 0, {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = msg
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in message_ids:
            after = self.answers_after[self.sent[mid].metadata.dst_node_id]
            if after is not None and self.pulls >= after:
                out.append(Message(RecordDict({M.CONFIG: ConfigRecord({"ok": 1})}), reply_to=self.sent[mid]))
        return out


def _messages(nodes):
    return [Message(RecordDict({M.CONFIG: ConfigRecord({})}), dst_node_id=n, message_type="train") for n in nodes]


@pytest.mark.usefixtures("task_identity")
def test_polling_grid_returns_as_soon_as_every_reply_is_in():
    grid = ScriptedGrid({1: 1, 2: 3, 3: 2})
    started = time.monotonic()
    replies = list(PollingGrid(grid).send_and_receive(_messages([1, 2, 3]), timeout=30))
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert not any(r.has_error() for r in replies) and grid.pulls == 3
    assert time.monotonic() - started < 1.0


@pytest.mark.usefixtures("task_identity")
def test_polling_grid_hands_each_reply_to_on_reply_as_it_arrives():
    grid = ScriptedGrid({1: 1, 2: 3, 3: 2})
    polling, seen = PollingGrid(grid), []
    polling.on_reply = lambda m: seen.append((m.metadata.src_node_id, grid.pulls))
    replies = list(polling.send_and_receive(_messages([1, 2, 3]), timeout=30))
    assert seen == [(1, 1), (3, 2), (2, 3)] and len(replies) == 3  # each at the pull that brought it, once


@pytest.mark.usefixtures("task_identity")
def test_polling_grid_turns_a_missing_reply_into_an_error_reply_after_the_timeout():
    grid = ScriptedGrid({1: 1, 2: None, 3: 1})
    replies = list(PollingGrid(grid).send_and_receive(_messages([1, 2, 3]), timeout=0.3))
    errors = [r for r in replies if r.has_error()]
    assert len(replies) == 3 and [r.metadata.src_node_id for r in errors] == [2]
    assert "no reply within 0.3 s (round-timeout)" in errors[0].error.reason


@pytest.mark.usefixtures("task_identity")
def test_polling_grid_attributes_the_superlinks_node_unavailable_error_to_the_node():
    grid = ScriptedGrid({1: 1, 2: None})
    flower_error = grid.pull_messages  # Flower's SuperLink answers for an offline node from its own id (1)

    def pull(ids):
        out = list(flower_error(ids))
        if grid.pulls == 2:
            late = next(m for m in grid.sent.values() if m.metadata.dst_node_id == 2)
            error = Message(Error(code=5, reason="Node Unavailable"), reply_to=late)
            error.metadata.__dict__["_src_node_id"] = 1
            out.append(error)
        return out

    grid.pull_messages = pull
    replies = list(PollingGrid(grid).send_and_receive(_messages([1, 2]), timeout=5))
    errors = [r for r in replies if r.has_error()]
    assert [(r.metadata.src_node_id, r.error.reason) for r in errors] == [(2, "Node Unavailable")]


@pytest.mark.usefixtures("task_identity")
def test_polling_grid_names_a_silent_node_as_registered(caplog):
    from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

    grid = ScriptedGrid({1: 1, 2: None})
    grid.get_nodes = lambda: [NodeInfo(node_id=1, name="berlin"), NodeInfo(node_id=2, name="paris")]
    polling = PollingGrid(grid)
    assert sorted(polling.get_node_ids()) == [1, 2] and polling.names == {1: "berlin", 2: "paris"}
    with caplog.at_level("WARNING", logger="fedfuse.server"):
        list(polling.send_and_receive(_messages([1, 2]), timeout=0.2))
    assert "paris sent no train reply within 0.2 s (round-timeout)" in caplog.text and "node 2" not in caplog.text


def test_the_run_log_names_sites_by_client_id_else_registered_name_else_node_id(tmp_path):
    config = parse_run_config(RunConfig().to_flat() | {"out-dir": str(tmp_path)})
    head = global_head_template(["image"], 6, ModelConfig(embed_dim=8, hidden_dim=8))
    strategy = FedFuse(config, RunState("r", 2, 0, head), None, RunFolder(tmp_path), {})
    strategy.node_names, strategy.node_clients = {1: "berlin", 2: "paris"}, {2: "paris-clinic"}
    assert [strategy.site_name(n) for n in (1, 2, 3, None)] == ["berlin", "paris-clinic", "node 3", "a client"]


def test_the_first_round_waits_for_min_clients_sites_instead_of_skipping_training(tmp_path):
    config = parse_run_config(RunConfig().to_flat() | {"out-dir": str(tmp_path), "min-clients": 2, "round-timeout": 30.0})
    head = global_head_template(["image"], 6, ModelConfig(embed_dim=8, hidden_dim=8))
    strategy = FedFuse(config, RunState("r", 2, 0, head), None, RunFolder(tmp_path), {})
    grid = ScriptedGrid({})
    arrivals = iter([[], [1], [1, 2, 3]])  # the sites connect while the run waits (checked once a second)
    grid.get_node_ids = lambda: list(next(arrivals, [1, 2, 3]))
    assert sorted(strategy.train_nodes(1, grid)) == [1, 2, 3]


def test_polling_grid_polls_a_simulations_replies_every_10_ms_and_a_deployments_every_200_ms():
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.simulation.run_simulation import FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager, ObjectStoreFactory
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    simulation, deployment = PollingGrid(InMemoryGrid(state_factory=factory)), PollingGrid(object())
    assert simulation.interval == SIMULATION_POLL_INTERVAL <= 0.01 and simulation.pull_share == PULL_SHARE == 20
    assert deployment.interval == POLL_INTERVAL == 0.2  # HttpGrid, FEDFUSE_REPLY_POLL_INTERVAL unset
    assert deployment.pull_share == 0  # a slow pull there is waiting, not work: the wait stays 0.2 s


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    "pull_share, pull_seconds, waits",
    [
        (PULL_SHARE, 0.005, [0.1, 0.1]),  # a simulation: a 5 ms pull (1,000 pending replies: 3 ms), then 100 ms waits
        (0.0, 0.5, [0.01, 0.01]),  # a deployment: a pull's time is waiting on the SuperLink, not the server's CPU
    ],
)
def test_polling_grid_waits_at_least_20_times_a_simulations_pull_cost_between_pulls(monkeypatch, pull_share, pull_seconds, waits):
    import server.grid

    class Clock:  # the grid's view of time
        now, slept = 0.0, []

        @classmethod
        def monotonic(cls):
            return cls.now

        @classmethod
        def sleep(cls, seconds):
            cls.slept.append(seconds)
            cls.now += seconds

    grid = ScriptedGrid({1: 3})
    pull = grid.pull_messages

    def slow_pull(ids):
        Clock.now += pull_seconds
        return pull(ids)

    grid.pull_messages = slow_pull
    monkeypatch.setattr(server.grid, "time", Clock)
    replies = list(PollingGrid(grid, pull_share=pull_share).send_and_receive(_messages([1]), timeout=30))
    assert len(replies) == 1 and Clock.slept == pytest.approx(waits)  # ScriptedGrid's own interval: 0.01 s


def test_polling_grid_sends_nothing_for_no_messages():
    grid = ScriptedGrid({})
    assert list(PollingGrid(grid).send_and_receive([], timeout=1)) == [] and grid.pulls == 0


def test_sample_nodes_gives_up_after_the_wait_and_says_what_to_do():
    started = time.monotonic()
    with pytest.raises(NodesUnavailableError, match=r"only 2 site\(s\) connected after waiting 0.3 s .* needs 3 \(min-clients\)"):
        sample_nodes(ScriptedGrid({}, nodes=(1, 2)), 3, 2, wait=0.3)
    assert time.monotonic() - started < 2.0
    chosen, every = sample_nodes(ScriptedGrid({}, nodes=(1, 2, 3)), 3, 3, wait=0.3)
    assert sorted(chosen) == [1, 2, 3] and every == [1, 2, 3]


@pytest.mark.parametrize("every, total, evaluating", [(1, 4, [1, 2, 3, 4]), (3, 7, [3, 6, 7]), (10, 4, [4])])
def test_evaluate_every_k_rounds_and_always_the_last(tmp_path, every, total, evaluating):
    config = parse_run_config(RunConfig().to_flat() | {"out-dir": str(tmp_path), "evaluate-every": every})
    head = global_head_template(["image"], 6, ModelConfig(embed_dim=8, hidden_dim=8))
    strategy = FedFuse(config, RunState("r", total, 0, head), None, RunFolder(tmp_path), {})
    assert [r for r in range(1, total + 1) if strategy.evaluates(r)] == evaluating


# --- real processes ------------------------------------------------------------------------------------
def _ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    """One SuperLink (TLS + node auth) and three registered sites behind warm executors, shared by the tests."""
    root = tmp_path_factory.mktemp("deploy")
    try:
        with deployment(root, sites=DEFAULT_SITES, max_epsilon=POLICY, run_config={"round-timeout": 60.0}) as d:
            yield d
    finally:
        assert leftover_processes(root) == []


@pytest.mark.slow
def test_three_sites_run_two_rounds_and_write_results_and_ledgers(dep):
    run = dep.run({"num-server-rounds": 2, "dp.epsilon": 3.0})
    results = run.results
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2]
    for rnd in results["rounds"]:
        assert rnd["train"]["trained"] == ["site-1", "site-2", "site-3"] and rnd["train"]["failed"] == {}
    assert "round 2/2 | trained 3/3 clients" in run.server_log  # fedfuse's progress lines reach `flwr log`
    clients = results["privacy"]["clients"]
    assert {c: set(v["modalities"]) for c, v in clients.items()} == {c: set(m) for c, m in DEFAULT_SITES.items()}
    for name in DEFAULT_SITES:
        assert 0 < clients[name]["epsilon"] <= 3.0 and clients[name]["rounds_trained"] == 2
        server_copy, site_copy = (
            _ledger(run.folder / "ledgers" / f"{name}.jsonl"),
            _ledger(dep.sites[name].state_dir / "ledger.jsonl"),
        )
        assert [e["round"] for e in server_copy] == [1, 2] and server_copy == site_copy[-2:]
        pinned = load_public_key_hex(dep.creds.site(name).ledger_public_key)  # signed with the key from `fedfuse certs`
        assert {e["public_key"] for e in server_copy} == {pinned}
        assert (dep.sites[name].state_dir / "model.safetensors").exists()
    audit = subprocess.run(
        [str(BIN / "fedfuse"), "audit", str(run.folder), "--keys", str(dep.creds.server_folder / "ledger-keys")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr  # signatures (pinned keys), chains, re-accounted epsilon
    # A site's privacy officer audits the site's own state folder, or its ledger.jsonl, with or without the pinned keys
    state = dep.sites["site-2"].state_dir
    assert (state / "train_log.jsonl").exists()  # beside the ledger, and not a ledger
    for target, keys in ((state, []), (state / "ledger.jsonl", ["--keys", str(dep.creds.server_folder / "ledger-keys")])):
        audit = subprocess.run([str(BIN / "fedfuse"), "audit", str(target), *keys], capture_output=True, text=True, timeout=300)
        assert audit.returncode == 0 and "site-2" in audit.stdout, audit.stdout + audit.stderr


@pytest.mark.slow
def test_a_site_refuses_an_app_whose_code_differs_from_the_fedfuse_it_installed(dep, tmp_path):
    # Prepare: the operator ships a modified ClientApp (here: one harmless extra line in the train handler)
    from test_provenance import app_copy

    app = app_copy(tmp_path / "app")
    handlers = app / "client" / "handlers.py"
    handlers.write_text(handlers.read_text() + "\nSHIPPED_BY_THE_OPERATOR = True\n")
    before = {name: _ledger(site.state_dir / "ledger.jsonl") for name, site in dep.sites.items()}
    # Execute
    run = dep.run({"num-server-rounds": 1, "dp.epsilon": 3.0, "round-timeout": 30.0}, app=app)
    # Assert: every site refused the task before the app was unpacked; nothing trained, nothing was spent
    rnd = run.results["rounds"][0]
    assert rnd["train"]["trained"] == [] and rnd["evaluate"] is None
    assert sorted(rnd["train"]["failed"].values()) == [M.FAILURE_APP_REFUSED] * 3
    for name, site in dep.sites.items():
        assert "refused the run's app" in dep.logs(name) and "client/handlers.py: differs" in dep.logs(name)
        assert _ledger(site.state_dir / "ledger.jsonl") == before[name]
    # and the genuine app still runs (the next tests)


@pytest.mark.slow
def test_a_supernode_with_an_unregistered_key_is_refused_and_gets_no_task(dep, tmp_path):
    rogue_key = (
        make_credentials(tmp_path / "rogue-creds", server_names="127.0.0.1", sites=["rogue"]).site("rogue").auth_private_key
    )
    proc = dep.start_unregistered("rogue", rogue_key)
    assert proc.wait(timeout=120) != 0
    log = dep.logs("rogue")
    assert "Failed to activate SuperNode" in log and "Receiving:" not in log
    assert [n["status"] for n in dep.nodes()] == ["online"] * 3  # the three registered sites, nobody else
    assert not (dep.root / "state" / "rogue").exists()  # no ClientApp ever ran for it
    # `fedfuse site supernode` turns Flower's generic connection failure into the likely causes, this one first
    hint = log[log.index("could not connect to the SuperLink") :].splitlines()
    assert hint[0].endswith(f"at {dep.address}. Likely causes:") and "key is not registered" in hint[1]
    assert any("wrong CA certificate" in line for line in hint[2:4]) and any("SuperLink is down" in line for line in hint[2:4])


def _fedfuse(dep, *args: str) -> subprocess.CompletedProcess:
    """The fedfuse CLI as the operator runs it (the flwr connection of the deployment)."""
    return subprocess.run(
        [str(BIN / "fedfuse"), *args],
        env=dep.env(dep.root / "homes" / "cli"),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_a_site_with_a_broken_data_folder_refuses_to_start_and_the_operator_sees_it_offline_by_name(dep, tmp_path):
    # Prepare: a fourth site, registered by name with `fedfuse sites register`, whose data folder has a bad label
    creds = make_credentials(tmp_path / "creds", server_names="127.0.0.1", sites=["oslo"]).site("oslo")
    registered = _fedfuse(dep, "sites", "register", str(creds.auth_public_key))  # named after the file: oslo.pub
    assert registered.returncode == 0 and registered.stdout.startswith("oslo: registered as SuperNode "), registered.stderr
    data = Path(write_sites(tmp_path / "data", {"oslo": ("signal",)}, samples=20)["oslo"])
    index = data / "index.csv"
    rows = [line.split(",") for line in index.read_text().splitlines()]
    rows[3][2] = "7"  # label out of range
    index.write_text("\n".join(",".join(r) for r in rows) + "\n")
    # Execute
    proc = dep.start_other("oslo", creds.auth_private_key, data_dir=data)
    # Assert: it stops at once with the validation report, before Flower starts; the operator sees it never connected
    assert proc.wait(timeout=120) == 2
    log = dep.logs("oslo")
    assert "this site is not ready to start (1 problem(s)); flower-supernode was not started" in log
    assert f"data-dir {data}: index.csv, row 2, column 'label': label 7 is out of range [0, 6)" in log
    assert "started flower-supernode" not in log and "SuperNode ID" not in log
    listed = _fedfuse(dep, "sites", "--json")
    assert listed.returncode == 0, listed.stderr
    sites = {s["name"]: s["status"] for s in json.loads(listed.stdout)["sites"]}
    assert sites == {"oslo": "registered", "site-1": "online", "site-2": "online", "site-3": "online"}
    table = _fedfuse(dep, "sites").stdout
    assert "oslo" in table and "registered (never connected)" in table and "3 of 4 site(s) online" in table


@pytest.mark.slow
def test_a_killed_site_is_recorded_as_failed_and_the_run_finishes_with_the_others(dep):
    run_id, folder = dep.submit(
        {"num-server-rounds": 2, "dp.epsilon": 4.0, "min-clients": 2, "round-timeout": 15.0, "evaluate-every": 2}
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill site-2 (SuperNode, executor, ClientApps) once round 1 is done
        results = folder / "results.json"
        if results.exists() and json.loads(results.read_text())["rounds"]:
            break
        time.sleep(0.5)
    dep.kill_site("site-2")  # the next test restarts it
    run = dep.wait(run_id, folder, timeout=300)
    assert run.status == "finished:completed", run.server_log[-3000:]
    first, second = run.results["rounds"]
    assert first["train"]["trained"] == ["site-1", "site-2", "site-3"] and first["evaluate"] is None  # evaluate-every = 2
    assert second["train"]["trained"] == ["site-1", "site-3"]
    assert second["train"]["failed"] == {"site-2": M.FAILURE_NO_REPLY}  # the dropout is explicit in results.json
    assert "site-2 failed (no-reply): no reply within 15 s (round-timeout)" in run.server_log
    assert "site-2 sent no train reply within 15 s" in run.server_log  # the grid names it as registered, not by node id
    assert second["evaluate"]["num_examples"] > 0  # the others still evaluate the final head


@pytest.mark.slow
def test_a_restarted_site_keeps_its_encoders_and_privacy_history(dep):
    site = dep.sites["site-2"]  # killed by the previous test (else stopped here): a restart after a crash
    if not _ledger(site.state_dir / "ledger.jsonl"):
        dep.run({"num-server-rounds": 1, "dp.epsilon": 3.0})
    dep.stop_site("site-2")
    before = {p.name: p.read_bytes() for p in site.state_dir.iterdir() if p.is_file() and p.suffix != ".lock"}
    eps_before = _ledger(site.state_dir / "ledger.jsonl")[-1]["epsilon"]

    dep.start_site("site-2")  # after a crash, once the SuperLink has marked the node offline
    after_restart = {p.name: p.read_bytes() for p in site.state_dir.iterdir() if p.is_file() and p.suffix != ".lock"}
    run = dep.run({"num-server-rounds": 1, "dp.epsilon": 5.0})

    assert after_restart == before  # the restart touched nothing in the state folder
    ledger = _ledger(site.state_dir / "ledger.jsonl")
    new = [e for e in ledger if e["run_id"] == run.results["run_id"]]
    assert len(new) == 1 and new[0]["status"] == "trained"
    # continues from the earlier runs' spend: this run's own ε within dp.epsilon, the lifetime within max-epsilon
    assert eps_before < new[0]["epsilon"] <= site.max_epsilon and new[0]["run_epsilon"] <= new[0]["run_budget"] == 5.0
    assert new[0]["prev_hash"] == ledger[-2]["entry_hash"]  # one chain across runs and restarts
    history = json.loads((site.state_dir / "privacy.json").read_text())
    assert len(history["rounds"]) == len(history["privacy"]["history"]) == len(ledger)  # every round, every run
    assert run.results["privacy"]["clients"]["site-2"]["epsilon"] == pytest.approx(new[0]["epsilon"])
    assert run.results["rounds"][0]["train"]["trained"] == ["site-1", "site-2", "site-3"]


@pytest.mark.slow
def test_a_run_asking_more_than_a_sites_policy_is_refused_by_that_site(dep):
    site3 = dep.sites["site-3"]
    ledger_before = _ledger(site3.state_dir / "ledger.jsonl")
    run = dep.run({"num-server-rounds": 1, "dp.epsilon": 6.0})
    results = run.results
    assert results["rounds"][0]["train"]["refused"] == {"site-3": M.STATUS_POLICY_REFUSED}
    assert results["rounds"][0]["train"]["trained"] == ["site-1", "site-2"]
    assert results["privacy"]["clients"]["site-3"]["status"] == f"excluded: {M.STATUS_POLICY_REFUSED}"
    expected = "the run asks for a budget of ε = 6 but this site's policy allows at most ε = 5"
    assert expected in dep.logs("site-3")  # the site's own log
    assert expected in run.server_log  # and its reply, as the ServerApp logged it
    assert _ledger(site3.state_dir / "ledger.jsonl") == ledger_before  # refused before touching any data
    # It evaluated nothing either: no metric of its held-out data is in the results, its refusal is recorded
    assert results["rounds"][0]["evaluate_replies"]["refused"] == {"site-3": M.STATUS_POLICY_REFUSED}
    assert results["rounds"][0]["evaluate_replies"]["evaluated"] == ["site-1", "site-2"]
    assert set(results["final"]["clients"]) == {"site-1", "site-2"}
    assert results["final"]["num_examples"] == sum(c["num_examples"] for c in results["final"]["clients"].values())
    # Its ledger came along with the refusal, so the run's audit with every pinned key passes
    audit = subprocess.run(
        [str(BIN / "fedfuse"), "audit", str(run.folder), "--keys", str(dep.creds.server_folder / "ledger-keys")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.mark.slow
def test_a_site_may_run_the_warm_executor_as_its_own_process(dep):
    # Prepare: site-1 as flower-supernode --isolation process + `fedfuse site executor` (two services)
    dep.stop_site("site-1")
    dep.start_site_split("site-1")
    # Execute (site-1's policy allows ε = 8 over its whole history; the earlier tests spent up to 6)
    run = dep.run({"num-server-rounds": 1, "dp.epsilon": 8.0})
    # Assert: the standalone executor ran site-1's ClientApp, with site-1's state
    results = run.results
    # (flower-supernode --isolation process runs no ClientApp itself: without the executor site-1 would time out)
    assert results["status"] == "completed" and "site-1" in results["rounds"][0]["train"]["trained"]
    assert dep.sites["site-1"].executor.poll() is None and "warm executor: taking ClientApp tasks" in dep.logs("site-1")
    assert (
        _ledger(dep.sites["site-1"].state_dir / "ledger.jsonl")[-1]["run_id"]
        == json.loads((run.folder / "run.json").read_text())["run_id"]
    )
    dep.stop_site("site-1")
    dep.start_site("site-1")  # back as the other tests expect it


@pytest.mark.slow
def test_a_run_gives_up_when_fewer_sites_than_min_clients_stay_connected(dep):
    dep.stop_site("site-2")  # a clean shutdown: the SuperLink forgets the node at once (last test: stays stopped)
    run = dep.run(
        {"num-server-rounds": 1, "dp.epsilon": 7.0, "min-clients": 3, "round-timeout": 5.0}, expect="finished:failed", timeout=180
    )
    results = run.results
    assert results["status"] == "failed" and results["rounds"] == []
    assert "only 2 site(s) connected after waiting 5 s (round-timeout), but the run needs 3 (min-clients)" in results["error"]
    assert "gave up waiting for sites" in run.server_log
