"""EMA of the global parameters (ema-decay): its maths, what clients get, checkpoints, resume, and its privacy cost."""

import json

import pytest
import torch
from flwr.app import ConfigRecord
from test_server import MODALITIES, FakeGrid, client_update, make_strategy, reply

from common import messages as M
from common.errors import ConfigError
from server.ema import ParameterEMA
from server.optimizer import ServerOptimizer
from server.run_folder import RunFolder
from server.strategy import FedFuse, RunState

pytestmark = pytest.mark.usefixtures("task_identity")


def test_the_ema_starts_at_the_first_value_and_then_moves_by_one_minus_decay():
    # Prepare
    ema = ParameterEMA(0.75)
    # Execute: rounds with every parameter 1, then 5, then 9; an encoder that first appears in round 2
    first = ema.update({"w": torch.tensor([1.0, -2.0])})
    second = ema.update({"w": torch.tensor([5.0, 2.0]), "enc": torch.tensor([4.0])})
    third = ema.update({"w": torch.tensor([9.0, 2.0]), "enc": torch.tensor([8.0])})
    # Assert: ema_1 = theta_1, ema_r = 0.75 ema_{r-1} + 0.25 theta_r; a new key starts at its value
    assert torch.equal(first["w"], torch.tensor([1.0, -2.0]))
    assert torch.allclose(second["w"], torch.tensor([2.0, -1.0]))
    assert torch.equal(second["enc"], torch.tensor([4.0]))
    assert torch.allclose(third["w"], torch.tensor([3.75, -0.25]))
    assert torch.allclose(third["enc"], torch.tensor([5.0]))


def test_the_ema_does_not_alias_the_values_it_was_given():
    theta = {"w": torch.tensor([1.0])}
    ema = ParameterEMA(0.5)
    ema.update(theta)
    theta["w"].add_(10.0)  # the server optimiser may update in place
    assert torch.equal(ema.state["w"], torch.tensor([1.0]))


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_an_ema_decay_outside_0_1_is_refused_with_the_key(tmp_path, decay):
    with pytest.raises(ConfigError, match=r"'ema-decay': must lie in \[0, 1\)"):
        make_strategy(tmp_path, **{"ema-decay": decay})


def train_round(strategy, r, value):
    strategy.aggregate_train(r, [reply(1, client_update(strategy, MODALITIES, value), client="c", modalities=MODALITIES)])


def test_clients_train_from_the_global_parameters_and_evaluate_the_ema(tmp_path):
    # Prepare: two rounds whose aggregate is every parameter 1, then 3 (plain FedAvg: global = aggregate)
    strategy = make_strategy(tmp_path, **{"ema-decay": 0.5})
    grid = FakeGrid([1, 2])
    train_round(strategy, 1, 1.0)
    strategy.end_round(1, None)
    train_round(strategy, 2, 3.0)
    # Execute: round 2's evaluate messages, its end, then round 3's train messages
    evaluate = list(strategy.configure_evaluate(2, None, ConfigRecord(), grid))
    strategy.end_round(2, None)
    train = list(strategy.configure_train(3, None, ConfigRecord(), grid))
    # Assert: evaluation sees the EMA 0.5 * 1 + 0.5 * 3 = 2; training the global 3
    key = next(iter(strategy.state.global_state))
    evaluated = dict(M.unpack_arrays(evaluate[0].content))
    trained = dict(M.unpack_arrays(train[0].content))
    assert torch.allclose(evaluated[key], torch.full_like(evaluated[key], 2.0))
    assert torch.allclose(trained[key], torch.full_like(trained[key], 3.0))
    assert set(evaluated) == set(trained) == set(strategy.state.global_state)


def test_the_checkpoint_holds_both_and_a_resumed_run_continues_the_ema(tmp_path):
    # Prepare: two rounds (aggregates 1 then 3), checkpointed
    strategy = make_strategy(tmp_path, **{"ema-decay": 0.5})
    for r, value in ((1, 1.0), (2, 3.0)):
        train_round(strategy, r, value)
        strategy.end_round(r, None)
    # Execute: resume from the checkpoint as the ServerApp does, train round 3 with aggregate 5
    checkpoint = RunFolder(tmp_path).load_checkpoint()
    rec = checkpoint.record
    state = RunState(
        "run-x", 5, checkpoint.round, checkpoint.global_state, rec["rounds"], rec["clients"], set(), checkpoint.ema_state
    )
    resumed = FedFuse(strategy.config, state, ServerOptimizer(), RunFolder(tmp_path), strategy.federation)
    train_round(resumed, 1, 5.0)
    resumed.end_round(1, None)
    # Assert: the checkpoint kept the global (3) and the EMA (2) apart, says what it serves, and the EMA went on (3.5)
    key = next(iter(checkpoint.global_state))
    assert torch.allclose(checkpoint.global_state[key], torch.full_like(checkpoint.global_state[key], 3.0))
    assert torch.allclose(checkpoint.served_state[key], torch.full_like(checkpoint.served_state[key], 2.0))
    assert set(checkpoint.ema_state) == set(checkpoint.global_state)
    assert not any(k.startswith("ema.") for k in checkpoint.optimizer_state)
    assert rec["served_model"] == {"parameters": "ema", "ema_decay": 0.5, "clients_train_from": "global"}
    final = RunFolder(tmp_path).load_checkpoint()
    assert final.round == 3
    assert torch.allclose(final.served_state[key], torch.full_like(final.served_state[key], 3.5))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["served_model"]["parameters"] == "ema"


def test_without_ema_the_run_serves_and_checkpoints_the_global_parameters(tmp_path):
    strategy = make_strategy(tmp_path)
    train_round(strategy, 1, 1.0)
    strategy.end_round(1, None)
    checkpoint = RunFolder(tmp_path).load_checkpoint()
    assert checkpoint.ema_state == {}
    assert checkpoint.served_state is checkpoint.global_state
    assert json.loads((tmp_path / "results.json").read_text())["served_model"] == {"parameters": "global"}


def test_a_round_without_updates_still_folds_the_unchanged_global_once(tmp_path):
    # Prepare: round 1 aggregates to 1; round 2 gets no update (global stays 1); round 3 aggregates to 4
    strategy = make_strategy(tmp_path, **{"ema-decay": 0.5})
    train_round(strategy, 1, 1.0)
    strategy.end_round(1, None)
    strategy.aggregate_train(2, [])
    strategy.served_state(2)  # evaluation and end of round both ask: folded once
    strategy.end_round(2, None)
    train_round(strategy, 3, 4.0)
    strategy.end_round(3, None)
    key = next(iter(strategy.state.global_state))
    # Assert: 1, 1, then 0.5 * 1 + 0.5 * 4
    assert torch.allclose(strategy.state.ema_state[key], torch.full_like(strategy.state.ema_state[key], 2.5))


SMALL_RUN = [
    "--set",
    "num-server-rounds=2",
    "--set",
    "data.num-clients=3",
    "--set",
    "data.samples-per-client=200",
    "--set",
    'data.groups="image+signal;signal+tabular;image+tabular"',
    "--set",
    'encoders="federated"',
    "--set",
    "dp.epsilon=4",
]


@pytest.mark.slow
def test_a_simulation_with_federated_encoders_serves_the_ema_at_the_same_privacy_cost(tmp_path):
    from common.fileio import load_tensors
    from fedfuse.cli import main

    # Execute: the same small run without and with the EMA
    runs = {}
    for name, extra in (("plain", []), ("ema", ["--set", "ema-decay=0.5"])):
        out = tmp_path / name
        assert main(["simulate", "--out", str(out), "--quiet", *SMALL_RUN, *extra]) == 0
        runs[name] = out
    results = {name: json.loads((out / "results.json").read_text()) for name, out in runs.items()}
    # Assert: every client spent exactly the same epsilon (the EMA is post-processing on the server)
    spent = {name: {c: r["epsilon"] for c, r in res["privacy"]["clients"].items()} for name, res in results.items()}
    assert spent["plain"] == spent["ema"] and len(spent["ema"]) == 3 and all(e > 0 for e in spent["ema"].values())
    assert results["ema"]["served_model"]["parameters"] == "ema"
    assert results["plain"]["served_model"] == {"parameters": "global"}
    assert results["ema"]["final"]["pooled"]["num_examples"] > 0  # the clients evaluated the EMA
    # The final checkpoint serves 0.5 * (round-1 global) + 0.5 * (round-2 global), encoders included
    first = load_tensors(runs["ema"] / "checkpoints" / "round-0001.safetensors")
    final = RunFolder(runs["ema"]).load_checkpoint()
    assert any(k.startswith("encoders.") for k in final.ema_state)
    for key, value in final.ema_state.items():
        assert torch.allclose(value, 0.5 * first[f"global.{key}"] + 0.5 * final.global_state[key], atol=1e-6), key
    assert not all(torch.equal(final.ema_state[k], final.global_state[k]) for k in final.ema_state)
