"""Secure aggregation (SecAgg+): the per-block weighted average from sums alone, the protocol run in process,
the configuration refusals, and end-to-end runs whose heads equal those of the same runs without it."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from simulate_helpers import checkpoint_reached, simulate

from client.handlers import handle_train
from client.secagg import encode_update, handle_secure_train
from common import messages as M
from common.config import RunConfig, parse_run_config
from common.data.partition import federation_space
from common.errors import ConfigError, NonFiniteError
from common.model.multimodal import ModelConfig, global_head_template
from common.privacy.ledger import Ledger, verify_chain
from fedfuse.cli import main
from server.aggregation import Contribution, weighted_average
from server.optimizer import build_optimizer
from server.replies import ReplyRejected
from server.run_folder import RunFolder
from server.secagg import (
    SumRejected,
    _SecAggPlus,
    decode_average,
    expected_weights,
    parse_clear_reply,
    quantization_range,
    run_secure,
)
from server.strategy import FedFuse, RunState

MODALITIES = ("image", "signal", "tabular")


def head(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return global_head_template(list(MODALITIES), 6, ModelConfig())


def client_update(reference, modalities, gen: torch.Generator, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A client's head after training: its blocks only, moved by random changes of about ``scale``."""
    keys = [k for k in reference if not k.startswith("head.blocks.") or k.split(".")[2] in modalities]
    return {k: reference[k] + scale * torch.randn(reference[k].shape, generator=gen) for k in keys}


def plain_average(reference, clients) -> dict[str, torch.Tensor]:
    """What FedFuse computes without secure aggregation."""
    averages, _ = weighted_average([Contribution(update, float(n)) for update, n in clients])
    return averages


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- the encoding: per-block weighted averages from sums ---------------------------------------------------


def test_quantization_range_is_the_largest_power_of_two_that_cannot_wrap():
    assert [quantization_range(n) for n in (2, 3, 4, 7, 8, 100)] == [2**30, 2**30, 2**29, 2**29, 2**28, 2**25]
    for n in range(2, 300):
        t = quantization_range(n)
        assert n * t < 2**32 and t <= 2**30 and (t == 2**30 or n * 2 * t >= 2**32)


def test_encode_sends_changes_for_held_keys_and_zeros_elsewhere():
    # Prepare
    reference = head()
    update = {k: v + 0.5 for k, v in reference.items() if not k.startswith("head.blocks.") or ".image." in k}
    layout = sorted(reference)
    # Execute
    vector = encode_update(update, reference, layout, weight=0.3, clipping_range=8.0)
    # Assert: one array per key plus the held indicator
    assert len(vector) == len(layout) + 1
    for key, change, held in zip(layout, vector, vector[-1]):
        if key in update:
            assert held == 1.0 and np.allclose(change, 0.5, atol=1e-6) and change.shape == tuple(reference[key].shape)
        else:
            assert held == 0.0 and not change.any()


def test_decode_of_exact_sums_equals_plain_per_block_weighted_averaging():
    # Prepare: four clients, different modalities and sizes; SecAgg+ outputs sum(r_i v_i) / sum(r_i), r_i = n_i / W
    reference, layout, gen = head(), sorted(head()), torch.Generator().manual_seed(3)
    clients = [
        (client_update(reference, mods, gen), n)
        for mods, n in ((("image", "signal"), 320), (("signal",), 75), (("image",), 960), (("signal", "tabular"), 512))
    ]
    W = 10000
    vectors = [encode_update(u, reference, layout, weight=n / W, clipping_range=8.0) for u, n in clients]
    total = sum(n / W for _, n in clients)
    mean = [sum(v[i] * (n / W) for v, (_, n) in zip(vectors, clients)) / total for i in range(len(layout) + 1)]
    expected = expected_weights(layout, [([m for m in MODALITIES if any(f".{m}." in k for k in u)], n) for u, n in clients])
    # Execute
    secure = decode_average(mean, layout, reference, expected, tolerance=1e-9)
    # Assert: the same keys, equal up to float32 rounding
    plain = plain_average(reference, clients)
    assert set(secure) == set(plain) == set(layout)  # tabular is held by one client, every key by someone
    assert expected["head.blocks.tabular.token.weight"] == pytest.approx(512 / (320 + 75 + 960 + 512))
    assert max((secure[k] - plain[k]).abs().max().item() for k in plain) <= 2e-7


def test_decode_skips_keys_nobody_holds_and_rejects_inconsistent_or_non_finite_sums():
    reference, layout = head(), sorted(head())
    update = {k: v + 1.0 for k, v in reference.items() if ".tabular." not in k}
    vector = encode_update(update, reference, layout, weight=1.0, clipping_range=8.0)
    expected = expected_weights(layout, [(("image", "signal"), 100)])
    averages = decode_average(vector, layout, reference, expected, tolerance=1e-9)
    assert set(averages) == set(update)
    assert torch.allclose(averages["head.core.score.bias"], reference["head.core.score.bias"] + 1.0)
    wrong = expected_weights(layout, [(("image",), 100)])  # a client claims fewer blocks than it sent
    with pytest.raises(SumRejected, match="total weight of 'head.blocks.signal"):
        decode_average(vector, layout, reference, wrong, tolerance=1e-4)
    with pytest.raises(SumRejected, match="non-finite"):
        decode_average(vector[:-2] + [vector[-2] * np.nan, vector[-1]], layout, reference, expected, tolerance=1e-4)


@pytest.mark.parametrize(
    "change, fragment, error",
    [
        ({"head.unknown": torch.zeros(2)}, "not in the federation's head", ValueError),
        ({"head.core.score.bias": torch.zeros(3)}, "has shape", ValueError),
        ({"head.core.score.bias": torch.tensor([math.inf])}, "non-finite", NonFiniteError),
        ({"head.core.score.bias": torch.tensor([90.0])}, "secagg.clipping-range", ConfigError),
    ],
)
def test_encode_refuses_what_secagg_cannot_sum_correctly(change, fragment, error):
    with pytest.raises(error, match=fragment):
        encode_update(change, head(), sorted(head()), weight=0.1, clipping_range=8.0)


# --- the real SecAgg+ protocol, in process -----------------------------------------------------------------


class LoopbackGrid(Grid):
    """Delivers each message to an in-process ClientApp function, copying contents as the wire would."""

    def __init__(self, apps: dict[int, Callable[[Message, Context], Message]], contexts: dict[int, Context]):
        self.apps, self.contexts, self.sent, self.replies = apps, contexts, [], []

    def set_run(self, run):
        pass

    @property
    def run(self):
        return SimpleNamespace(run_id=5)

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)
            node = msg.metadata.dst_node_id
            self.sent.append((node, msg.metadata.message_type, sorted(msg.content.array_records)))
            try:
                reply = self.apps[node](msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001  (Flower's runtime turns a raising ClientApp into an error reply)
                replies.append(Message(Error(code=0, reason=repr(exc)), reply_to=msg))
                continue
            self.replies.append((node, sum(len(r) for r in reply.content.array_records.values())))
            replies.append(reply)
        return replies


class MeanOnly(Strategy):
    """A legacy strategy that sends one FitIns to given nodes and keeps SecAgg+'s unmasked mean."""

    def __init__(self, grid, nodes):
        self.grid, self.nodes, self.mean = grid, nodes, None

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters([])

    def configure_fit(self, server_round, parameters, client_manager):
        fitins = FitIns(ndarrays_to_parameters([]), {})
        return [(GridClientProxy(node_id=n, grid=self.grid, run_id=5), fitins) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, *args):
        return []

    def aggregate_evaluate(self, *args):
        return None, {}

    def evaluate(self, *args):
        return None


def legacy_context(strategy) -> LegacyContext:
    context = LegacyContext(Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters([]), True)
    return context


@pytest.mark.usefixtures("task_identity")
def test_secaggplus_sums_the_encoded_updates_within_its_rounding():
    # Prepare: five clients with realistic heads and example counts; each sends its encoded update through SecAgg+
    reference, layout, gen = head(), sorted(head()), torch.Generator().manual_seed(7)
    specs = [
        (("image", "signal", "tabular"), 960),
        (("image",), 320),
        (("signal",), 48),
        (("tabular", "signal"), 700),
        (("image", "tabular"), 1200),
    ]
    clients = {10 + i: (client_update(reference, mods, gen), n) for i, (mods, n) in enumerate(specs)}
    W, c = 10000, 8.0

    def app(node):
        update, n = clients[node]

        def inner(msg, ctx):
            vector = encode_update(update, reference, layout, weight=n / W, clipping_range=c)
            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), n, {})
            return Message(compat.fitres_to_recorddict(fitres, False), reply_to=msg)

        return lambda msg, ctx: secaggplus_mod(msg, ctx, inner)

    contexts = {n: Context(run_id=5, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in clients}
    grid = LoopbackGrid({n: app(n) for n in clients}, contexts)
    strategy = MeanOnly(grid, list(clients))
    T = quantization_range(len(clients))
    # Execute: Flower's own workflow, all four stages
    _SecAggPlus(1.0, 0.67, max_weight=float(W), clipping_range=c, quantization_range=T, modulus_range=2**32)(
        grid, legacy_context(strategy)
    )
    # Assert: four message phases per client, no reply carrying an array (only SecAgg+'s masked bytes)
    assert [t for _, t, _ in grid.sent].count("train") == 4 * len(clients)
    assert all(count == 0 for _, count in grid.replies)
    expected = expected_weights(layout, [(specs[i][0], n) for i, (_, n) in enumerate(clients.values())])
    secure = decode_average(strategy.mean, layout, reference, expected, tolerance=1e-4)
    plain = plain_average(reference, list(clients.values()))
    error = max((secure[k] - plain[k]).abs().max().item() for k in plain)
    # bound: 5 clients' rounding (step 2c/T each) over the smallest holder weight (tabular: 700 + 960 + 1200)
    assert error <= len(clients) * (2 * c / T) * 1.5 / ((700 + 960 + 1200) / W) + 1e-7
    assert error < 1e-5


# --- the clear part of a secure reply -----------------------------------------------------------------------


def clear_fitres(weight=320, status=M.STATUS_OK, **metric_overrides) -> FitRes:
    identity = {M.CLIENT_ID: "client-01", M.MODALITIES: ["image"], M.STATUS: status, M.REASON: "", M.LEDGER: []}
    metrics = {M.NUM_EXAMPLES: 320, M.EPSILON: 1.5, M.BUDGET: 8.0} | metric_overrides
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), weight, metrics | {M.CLIENT: json.dumps(identity)})


def test_the_clear_part_is_validated_like_a_plain_reply():
    reply = parse_clear_reply(clear_fitres(), node_id=3)
    assert (reply.client_id, reply.modalities, reply.num_examples, reply.node_id) == ("client-01", ("image",), 320, 3)
    assert reply.metrics[M.EPSILON] == 1.5 and reply.arrays == {}
    with pytest.raises(ReplyRejected, match="SecAgg\\+ weight 500 does not match"):
        parse_clear_reply(clear_fitres(weight=500), node_id=3)
    with pytest.raises(ReplyRejected, match="does not match its status 'budget-exhausted'"):
        parse_clear_reply(clear_fitres(status=M.STATUS_BUDGET_EXHAUSTED), node_id=3)
    assert (
        parse_clear_reply(clear_fitres(weight=0, status=M.STATUS_BUDGET_EXHAUSTED), node_id=3).status == M.STATUS_BUDGET_EXHAUSTED
    )
    with pytest.raises(ReplyRejected, match="'epsilon' must be a number"):
        parse_clear_reply(clear_fitres(epsilon=math.nan), node_id=3)
    broken = clear_fitres()
    broken.metrics[M.CLIENT] = "{not json"
    with pytest.raises(ReplyRejected, match="unreadable clear part"):
        parse_clear_reply(broken, node_id=3)


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        ({"encoders": "federated"}, "secagg.enabled", "federated encoders are sized by each site's data schema"),
        ({"min-clients": 1}, "secagg.enabled", "at least 2 clients per round"),
        ({"secagg.num-shares": 0.0}, "secagg.num-shares", "must lie in \\(0, 1\\]"),
        ({"secagg.reconstruction-threshold": 1.5}, "secagg.reconstruction-threshold", "must lie in \\(0, 1\\]"),
        ({"secagg.clipping-range": 0.5}, "secagg.clipping-range", ">= 1"),
        ({"secagg.max-weight": 0}, "secagg.max-weight", ">= 1"),
    ],
)
def test_configurations_secure_aggregation_cannot_serve_are_refused(overrides, key, fragment):
    with pytest.raises(ConfigError, match=f"'{key}'.*{fragment}"):
        parse_run_config({"secagg.enabled": True} | overrides)


def test_everything_else_combines_with_secure_aggregation():
    for overrides in (
        {"strategy": "fedadam"},
        {"strategy": "fedprox"},
        {"dp.epsilon": 1.0},
        {"model.fusion": "late"},
        {"release.train-metrics": True},
        {"fraction-train": 0.5},
    ):
        assert parse_run_config({"secagg.enabled": True} | overrides).secagg.enabled


# --- the real handlers and FedFuse, one round in process: secure equals plain -----------------------------


def run_config(tmp_path, **overrides):
    return (
        RunConfig().to_flat()
        | {
            "out-dir": str(tmp_path),
            "data.num-clients": 3,
            "data.samples-per-client": 200,
            "data.groups": "image+signal;signal;image+tabular",
            "dp.epsilon": math.inf,
            "train.batch-size": 50,
            "num-server-rounds": 2,
            "fraction-evaluate": 0.0,
        }
        | overrides
    )


def federation(flat, tmp_path, app, *, partitions=3, extra=None):
    """FedFuse as the ServerApp builds it, and a loopback grid to simulated clients running ``app`` (+ ``extra``:
    node id -> (app, node config))."""
    config = parse_run_config(flat)
    folder = RunFolder(tmp_path)
    modalities, labels = federation_space(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.server.seed)
        global_state = global_head_template(modalities, len(labels), ModelConfig())
    state = RunState(folder.open_run(config.to_flat()), config.server.num_server_rounds, 0, global_state)
    fed = FedFuse(config, state, build_optimizer("fedavg", 0.05), folder, {"modalities": list(modalities)})
    nodes = {100 + i: (app, {"partition-id": i, "num-partitions": 3}) for i in range(partitions)} | (extra or {})
    contexts = {
        n: Context(run_id=5, node_id=n, node_config=node_config, state=RecordDict(), run_config=flat)
        for n, (_, node_config) in nodes.items()
    }
    return fed, LoopbackGrid({n: a for n, (a, _) in nodes.items()}, contexts)


def plain_round(flat, tmp_path, **kwargs):
    """The head after one plain FedFuse round."""
    fed, grid = federation(flat, tmp_path, handle_train, **kwargs)
    fed.aggregate_train(1, grid.send_and_receive(fed.configure_train(1, ArrayRecord(), ConfigRecord(), grid)))
    return fed


def secure_round(flat, tmp_path, app=None, **kwargs):
    """The FedFuse after one round with secure aggregation."""
    fed, grid = federation(flat, tmp_path, app or secure_app, **kwargs)
    run_secure(fed, grid, Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=flat), num_rounds=1)
    return fed


def secure_app(msg, context):
    return (
        secaggplus_mod(msg, context, handle_secure_train)
        if "secaggplus_configs" in msg.content.config_records
        else handle_train(msg, context)
    )


@pytest.mark.usefixtures("task_identity")
def test_one_secure_round_gives_the_plain_round_head(tmp_path):
    # Prepare: the same federation twice (no DP noise, fixed seed: training is deterministic)
    flat_plain, flat_secure = run_config(tmp_path / "plain"), run_config(tmp_path / "secure", **{"secagg.enabled": True})
    # Execute: one plain round through FedFuse; one secure round through SecAgg+
    plain = plain_round(flat_plain, tmp_path / "plain")
    secure, secure_grid = federation(flat_secure, tmp_path / "secure", secure_app)
    run_secure(
        secure,
        secure_grid,
        Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=flat_secure),
        num_rounds=1,
    )
    # Assert: equal heads (measured: 9e-7); every client trained once and its ledger reached the server in the clear
    assert max_difference(plain.state.global_state, secure.state.global_state) < 1e-5
    assert secure.state.rounds[0]["train"]["trained"] == ["client-00", "client-01", "client-02"]
    assert sorted(p.name for p in (tmp_path / "secure" / "ledgers").iterdir()) == [f"client-0{i}.jsonl" for i in range(3)]
    assert (tmp_path / "secure" / "checkpoints" / "round-0001.safetensors").exists()
    # 4 message phases per client; no reply carried an array (the masked vector travels as SecAgg+ bytes)
    assert len(secure_grid.replies) == 4 * 3 and all(count == 0 for _, count in secure_grid.replies)


def refusing_site(tmp_path) -> dict:
    """A deployed site whose policy (max-epsilon 1) refuses the run's non-private request."""
    from common.data import synthetic
    from common.data.site_folders import write_site

    data = synthetic.generate(100, seed=5).restrict(("image",))
    folder = write_site(tmp_path / "site-x", data, ["train"] * 80 + ["test"] * 20, name="site-x")
    return {
        "data-dir": str(folder),
        "state-dir": str(tmp_path / "state-x"),
        "client-id": "site-x",
        "max-epsilon": 1.0,
        "num-train-examples": 80,
    }


@pytest.mark.usefixtures("task_identity")
def test_a_refusing_site_adds_nothing_to_the_sum_and_is_excluded(tmp_path):
    # Prepare: three simulated sites and one whose policy refuses the run
    flat = run_config(tmp_path / "plain")
    plain = plain_round(flat, tmp_path / "plain", extra={200: (handle_train, refusing_site(tmp_path / "p"))})
    flat = run_config(tmp_path / "secure", **{"secagg.enabled": True})
    # Execute
    secure = secure_round(flat, tmp_path / "secure", extra={200: (secure_app, refusing_site(tmp_path / "s"))})
    # Assert: it took part in SecAgg+ with weight 0, the head is the plain one, it is excluded from now on
    assert max_difference(plain.state.global_state, secure.state.global_state) < 1e-5
    train = secure.state.rounds[0]["train"]
    assert train["refused"] == {"site-x": M.STATUS_POLICY_REFUSED} and len(train["trained"]) == 3
    assert secure.state.excluded == {"site-x"} and 200 not in secure.train_nodes(2, LoopbackGrid({}, {200: None, 100: None}))


@pytest.mark.usefixtures("task_identity")
def test_a_site_failing_mid_protocol_drops_out_and_the_others_are_aggregated(tmp_path):
    # Prepare: four sites; the fourth raises when asked for its masked vector (after key sharing)
    def failing_app(msg, context):
        if msg.content.config_records["secaggplus_configs"].get("stage") == "collect_masked_vectors":
            raise RuntimeError("site down")
        return secure_app(msg, context)

    flat = run_config(tmp_path / "plain")
    plain = plain_round(flat, tmp_path / "plain")
    flat = run_config(tmp_path / "secure", **{"secagg.enabled": True})
    # Execute
    secure = secure_round(flat, tmp_path / "secure", extra={200: (failing_app, {})})
    # Assert: SecAgg+ removed its masks (3 of 4 shares suffice); the head is the three others' plain average
    assert max_difference(plain.state.global_state, secure.state.global_state) < 1e-5
    train = secure.state.rounds[0]["train"]
    assert train["failed"] == {"node 200": M.FAILURE_DROPPED} and train["trained"] == ["client-00", "client-01", "client-02"]


@pytest.mark.usefixtures("task_identity")
def test_a_site_above_max_weight_is_refused_before_it_trains(tmp_path):
    flat = run_config(tmp_path, **{"secagg.enabled": True, "secagg.max-weight": 100})
    reference = head()
    layout = sorted(reference)
    fitins = FitIns(
        ndarrays_to_parameters([reference[k].numpy() for k in layout]),
        {M.SERVER_ROUND: 1, M.RUN_ID: "r", M.PLANNED_ROUNDS: 2, M.LAYOUT: json.dumps(layout)},
    )
    msg = Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=100, message_type="train")
    context = Context(
        run_id=5, node_id=100, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config=flat
    )
    with pytest.raises(ConfigError, match="more than secagg.max-weight = 100; .*Set secagg.max-weight >= 160"):
        handle_secure_train(msg, context)
    assert not (tmp_path / "clients").exists()  # nothing trained, nothing spent


# --- end to end: real Flower simulations (Ray) and a real deployment -----------------------------------------

# Deterministic: no DP noise, a fixed seed (two plain runs give bit-identical heads, checked below)
DETERMINISTIC = [
    "--set",
    "num-server-rounds=3",
    "--set",
    "data.num-clients=4",
    "--set",
    "data.samples-per-client=400",
    "--set",
    'data.groups="image+signal;signal;image;signal+tabular"',
    "--set",
    "dp.epsilon=inf",
]
SECURE = ["--set", "secagg.enabled=true"]
TOLERANCE = 1e-4  # measured: 5e-6 after three rounds (README, Secure aggregation)


def final_head(out: Path, rounds: int = 3) -> dict[str, torch.Tensor]:
    checkpoint = RunFolder(out).load_checkpoint()
    assert checkpoint is not None and checkpoint.round == rounds
    return checkpoint.global_state


def assert_ledgers_reached_the_server(out: Path, clients: list[str], rounds: list[int]) -> None:
    for cid in clients:
        own = Ledger(out / "clients" / cid / "ledger.jsonl").entries()
        assert verify_chain(own) == [] and [e["round"] for e in own] == rounds, cid
        copy_ = Ledger(out / "ledgers" / f"{cid}.jsonl").entries()
        assert [e["entry_hash"] for e in copy_] == [e["entry_hash"] for e in own], cid


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert main(["simulate", "--out", str(out), "--quiet", *DETERMINISTIC]) == 0
    return out


@pytest.mark.slow
def test_two_plain_runs_give_identical_heads(plain_run, tmp_path):
    # What the comparisons below rest on: the same run twice gives the same head, bit for bit
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), "--quiet", *DETERMINISTIC]) == 0
    assert max_difference(final_head(plain_run), final_head(out)) == 0.0


@pytest.mark.slow
def test_secure_aggregation_gives_the_plain_head_in_simulation(plain_run, tmp_path):
    # Execute
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), "--quiet", *DETERMINISTIC, *SECURE]) == 0
    # Assert: the same head within float tolerance; results, checkpoints and ledgers as in a plain run
    assert max_difference(final_head(plain_run), final_head(out)) < TOLERANCE
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["config"]["secagg.enabled"] is True
    clients = ["client-00", "client-01", "client-02", "client-03"]
    assert [r["train"]["trained"] for r in results["rounds"]] == [clients] * 3
    assert all(r["evaluate"]["pooled"]["accuracy"] > 0 for r in results["rounds"])
    assert_ledgers_reached_the_server(out, clients, [1, 2, 3])


@pytest.mark.slow
def test_a_killed_secure_run_resumes_to_the_plain_head(plain_run, tmp_path):
    # Prepare: start the secure run in its own process group and kill it hard after round 1
    out = tmp_path / "run"
    simulate(["--out", str(out), *DETERMINISTIC, *SECURE], out, until=checkpoint_reached(out, 1))
    # Execute
    assert main(["simulate", "--resume", str(out), "--quiet"]) == 0
    # Assert: every round once, each client's ledger one chain, and still the plain run's head
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert_ledgers_reached_the_server(out, ["client-00", "client-01", "client-02", "client-03"], [1, 2, 3])
    assert max_difference(final_head(plain_run), final_head(out)) < TOLERANCE


@pytest.mark.slow
def test_secure_aggregation_gives_the_plain_head_in_deployment(tmp_path):
    from simulations.deployment import deployment, leftover_processes

    # Prepare: three sites over TLS + SuperNode auth that accept non-private runs; fresh site state per run
    config = {"dp.epsilon": math.inf, "num-server-rounds": 2}
    heads = {}
    with deployment(tmp_path / "dep", max_epsilon=math.inf, run_config=config) as dep:
        for name, secure in (("plain", False), ("secure", True)):
            for site in dep.sites.values():  # the same starting point for both runs (encoders, privacy, ledger)
                shutil.rmtree(site.state_dir, ignore_errors=True)
                site.state_dir.mkdir(parents=True)
            # Execute
            run = dep.run({"secagg.enabled": secure}, timeout=600)
            # Assert: both complete with every site trained each round and its ledger at the server
            results = run.results
            assert [r["train"]["trained"] for r in results["rounds"]] == [sorted(dep.sites)] * 2, name
            for site in dep.sites.values():
                own = Ledger(site.state_dir / "ledger.jsonl").entries()
                copy_ = Ledger(run.folder / "ledgers" / f"{site.name}.jsonl").entries()
                assert [e["entry_hash"] for e in copy_] == [e["entry_hash"] for e in own] and len(own) == 2
            heads[name] = final_head(run.folder, rounds=2)
    assert leftover_processes(tmp_path / "dep") == []
    assert max_difference(heads["plain"], heads["secure"]) < TOLERANCE
