"""End to end: real Flower simulations (Ray), real Opacus, real files. Slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from simulate_helpers import checkpoint_reached, simulate

from common import messages as M
from common.privacy.accounting import PrivacyHistory
from common.privacy.ledger import Ledger, verify_chain
from fedfuse.cli import main

pytestmark = pytest.mark.slow

SCENARIO = [
    "--set",
    "num-server-rounds=3",
    "--set",
    "data.num-clients=4",
    "--set",
    "data.samples-per-client=400",
    "--set",
    'data.groups="image+signal;signal;image;signal+tabular"',
    "--set",
    "train.local-epochs=2",
    "--set",
    "dp.epsilon=6",
]


def clients_of(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "clients").iterdir())


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """One real simulation; every reply that reaches the SuperLink's state is recorded on the way."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    out = tmp_path_factory.mktemp("sim") / "run"
    wire: list[tuple[str, int, list[str]]] = []
    original = InMemoryLinkState.store_message_res

    def record(self, message):
        arrays = list(M.unpack_arrays(message.content)) if not message.has_error() else []  # (names of what it carries)
        wire.append((message.metadata.message_type, message.metadata.src_node_id, arrays))
        return original(self, message)

    InMemoryLinkState.store_message_res = record
    try:
        status = main(["simulate", "--out", str(out), "--quiet", *SCENARIO])
    finally:
        InMemoryLinkState.store_message_res = original
    return status, out, json.loads((out / "results.json").read_text()), wire


def test_the_run_completes_and_writes_results_plots_and_checkpoints(simulated):
    status, out, results, _ = simulated
    assert status == 0 and results["status"] == "completed"
    assert {"results.json", "accuracy.png", "epsilon.png", "run.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "checkpoints" / "latest.json").read_text()) == {"round": 3}


def test_the_run_writes_its_report_and_modality_contributions(simulated):
    _, out, results, _ = simulated
    assert "Modality contributions" in (out / "report.html").read_text()
    assert all("modality_contributions" in r["evaluate"] for r in results["rounds"])
    mc = results["final"]["modality_contributions"]
    # No client holds image and tabular together: no game for the federation, and the reason says so.
    assert "image+tabular" in mc["overall"]["accuracy"]["error"]
    both = mc["clients"]["client-00"]["accuracy"]  # image+signal
    assert sum(both["shapley"].values()) == pytest.approx(both["full"] - 1 / 6)
    assert set(mc["attention"]) == {"image", "signal", "tabular"}


def test_results_json_schema(simulated):
    _, _, results, _ = simulated
    assert {"config", "rounds", "final", "privacy"} <= set(results)
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    for entry in [r["evaluate"] for r in results["rounds"]] + [results["final"]]:
        assert {"num_examples", "pooled", "client_mean", "clients"} <= set(entry)
        for figures in (entry["pooled"], entry["client_mean"]):
            assert {"accuracy", "macro_f1", "by_modalities"} <= set(figures)
            for subset, metrics in figures["by_modalities"].items():
                assert set(subset.split("+")) <= {"image", "signal", "tabular"}
                assert {"accuracy", "macro_f1", "num_examples"} <= set(metrics)
        pooled = entry["pooled"]
        assert pooled["num_examples"] == entry["num_examples"] == sum(map(sum, pooled["confusion"]))
        assert pooled["accuracy"] == pytest.approx(entry["client_mean"]["accuracy"])  # the same for accuracy
    assert isinstance(results["warnings"], list)
    for cid, client in results["privacy"]["clients"].items():
        assert {"epsilon", "delta", "budget", "rounds_trained", "modalities"} <= set(client), cid
        # the run's allowance and the site's lifetime cap, with the run's own spend and the spend before it
        assert {"run_epsilon", "max_epsilon", "epsilon_before_run"} <= set(client), cid
        assert client["epsilon_before_run"] == 0.0 and client["run_epsilon"] == pytest.approx(client["epsilon"])


def test_only_head_arrays_cross_the_wire(simulated):
    _, _, _, wire = simulated
    train = [(node, keys) for kind, node, keys in wire if kind == "train"]
    assert len(train) == 4 * 3  # every client, every round
    assert all(keys and all(k.startswith("head.") for k in keys) for _, keys in train)
    assert all(not keys for kind, _, keys in wire if kind == "evaluate")


def test_fused_model_beats_chance_and_every_client_stays_within_budget(simulated):
    _, out, results, _ = simulated
    assert results["final"]["pooled"]["accuracy"] > 1 / 6 + 0.12  # chance is 1/6; 3 small DP rounds
    for cid, client in results["privacy"]["clients"].items():
        assert client["rounds_trained"] == 3
        assert 0 < client["epsilon"] <= client["budget"] == 6.0
        # the client's own history gives the same epsilon the server reported
        history = PrivacyHistory.from_dict(json.loads((out / "clients" / cid / "privacy.json").read_text())["privacy"])
        assert history.epsilon() == pytest.approx(client["epsilon"])


def test_an_existing_run_folder_is_never_overwritten(simulated, capsys):
    _, out, _, _ = simulated
    before = (out / "results.json").read_bytes()
    assert main(["simulate", "--out", str(out), *SCENARIO]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_resume_after_a_killed_run_trains_every_round_once(tmp_path):
    # Prepare: start a 4-round run in its own process group and kill it hard after round 2
    out = tmp_path / "run"
    simulate(["--out", str(out), *SCENARIO[:-2], "--set", "num-server-rounds=4"], out, until=checkpoint_reached(out, 2))
    # Execute
    assert main(["simulate", "--resume", str(out), "--quiet"]) == 0
    # Assert: four rounds, each once; every client's privacy history is one continuous chain
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4]
    for cid in clients_of(out):
        privacy = json.loads((out / "clients" / cid / "privacy.json").read_text())
        assert [r for _, r in privacy["rounds"]] == [1, 2, 3, 4], cid
        assert len(privacy["privacy"]["history"]) == 4
        entries = Ledger(out / "clients" / cid / "ledger.jsonl").entries()
        assert verify_chain(entries) == [] and [e["round"] for e in entries] == [1, 2, 3, 4]
        federation_copy = Ledger(out / "ledgers" / f"{cid}.jsonl").entries()
        assert [e["entry_hash"] for e in federation_copy] == [e["entry_hash"] for e in entries]
        assert entries[-1]["epsilon"] == pytest.approx(results["privacy"]["clients"][cid]["epsilon"])
