"""Server strategy, called directly with constructed replies: validation, per-block weights, exclusion, files."""

import json

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from common import messages as M
from common.config import RunConfig, parse_run_config
from common.errors import ConfigError, FedfuseError
from common.model.multimodal import ModelConfig, global_head_template
from common.privacy.ledger import Ledger, LedgerKey, encode_entry, entry_fields
from server.aggregation import Contribution, weighted_average
from server.optimizer import FedAdam, FedYogi, ServerOptimizer, build_optimizer
from server.replies import EvaluateReply, mean_metrics
from server.run_folder import RunFolder
from server.strategy import FedFuse, RunState

pytestmark = pytest.mark.usefixtures("task_identity")
MODALITIES = ["image", "signal"]


class FakeGrid:
    """The edge we do not start here: a grid that knows which nodes are connected."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def make_strategy(tmp_path, **overrides):
    config = parse_run_config(RunConfig().to_flat() | {"out-dir": str(tmp_path)} | overrides)
    head = global_head_template(MODALITIES, 6, ModelConfig(embed_dim=8, hidden_dim=8))
    state = RunState("run-x", 5, 0, head)
    folder = RunFolder(tmp_path)
    return FedFuse(config, state, ServerOptimizer(), folder, {"modalities": MODALITIES, "labels": list("abcdef")})


def client_update(strategy, modalities, value):
    """A head update for a client holding ``modalities``: every parameter equal to ``value``."""
    keep = lambda k: not k.startswith("head.blocks.") or k.split(".")[2] in modalities  # noqa: E731
    return {k: torch.full_like(v, value) for k, v in strategy.state.global_state.items() if keep(k)}


def reply(node, arrays, *, client, modalities, n=10, status=M.STATUS_OK, ledger=None, metrics=None):
    request = Message(RecordDict({M.CONFIG: ConfigRecord({})}), dst_node_id=node, message_type="train")
    content = {
        M.METRICS: MetricRecord({M.NUM_EXAMPLES: n, M.EPSILON: 1.0, M.BUDGET: 8.0} | (metrics or {})),
        M.CLIENT: ConfigRecord({M.CLIENT_ID: client, M.MODALITIES: modalities, M.STATUS: status, M.LEDGER: ledger or []}),
    }
    if arrays is not None:
        content.update(M.pack_arrays(arrays))
    return Message(RecordDict(content), reply_to=request)


def sign_round(ledger, key, r, update_hash):
    """Client c's round ``r`` of run-x, trained (ε = r), signed into its own ``ledger``: the entry."""
    fields = entry_fields(
        run_id="run-x",
        client_id="c",
        round=r,
        status="trained",
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=10,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant="prv",
        epsilon=float(r),
        budget=8.0,
        update_hash=update_hash,
    )
    return ledger.append(fields, key)


def test_weighted_average_weights_each_block_by_the_examples_that_trained_it():
    a = Contribution({"core": torch.tensor([1.0]), "blocks.image": torch.tensor([1.0])}, 10)
    b = Contribution({"core": torch.tensor([4.0]), "blocks.signal": torch.tensor([7.0])}, 30)
    averages, weights = weighted_average([a, b])
    assert weights == {"core": 40.0, "blocks.image": 10.0, "blocks.signal": 30.0}
    assert averages["core"].item() == pytest.approx((10 * 1 + 30 * 4) / 40)
    assert averages["blocks.image"].item() == 1.0 and averages["blocks.signal"].item() == 7.0


def test_aggregation_averages_modality_blocks_over_their_holders_only(tmp_path):
    strategy = make_strategy(tmp_path)
    image_block = next(k for k in strategy.state.global_state if k.startswith("head.blocks.image."))
    signal_block = next(k for k in strategy.state.global_state if k.startswith("head.blocks.signal."))
    core = next(k for k in strategy.state.global_state if k.startswith("head.core."))
    replies = [
        reply(1, client_update(strategy, ["image"], 1.0), client="a", modalities=["image"], n=10),
        reply(2, client_update(strategy, ["image", "signal"], 3.0), client="b", modalities=["image", "signal"], n=30),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    assert torch.allclose(new[core], torch.full_like(new[core], 2.5))  # (10*1 + 30*3) / 40
    assert torch.allclose(new[image_block], torch.full_like(new[image_block], 2.5))
    assert torch.allclose(new[signal_block], torch.full_like(new[signal_block], 3.0))  # only b holds signal


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda u: u.update({next(iter(u)): torch.full_like(next(iter(u.values())), float("nan"))}), "non-finite"),
        (lambda u: u.update({next(iter(u)): torch.zeros(3)}), "has shape"),
        (lambda u: u.update({"head.blocks.audio.token.weight": torch.zeros(2)}), "unknown key"),
        (lambda u: u.update({"encoders.image.fc.weight": torch.zeros(2)}), "encoders are local"),
    ],
)
def test_unsafe_replies_are_rejected_and_the_round_goes_on(tmp_path, mutate, fragment):
    strategy = make_strategy(tmp_path)
    bad = client_update(strategy, MODALITIES, 100.0)
    mutate(bad)
    good = client_update(strategy, MODALITIES, 1.0)
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, bad, client="bad", modalities=MODALITIES), reply(2, good, client="good", modalities=MODALITIES)]
    )
    assert fragment in strategy.round_record["train"]["rejected"]["bad"]
    assert strategy.round_record["train"]["trained"] == ["good"]
    assert all(torch.allclose(v, torch.ones_like(v)) for v in arrays.to_torch_state_dict().values())


def test_a_reply_whose_packing_does_not_fit_its_array_is_rejected(tmp_path):
    strategy = make_strategy(tmp_path)
    bad = reply(1, client_update(strategy, MODALITIES, 100.0), client="bad", modalities=MODALITIES)
    packing = dict(bad.content.config_records[M.PACKING])
    bad.content[M.PACKING] = ConfigRecord(packing | {"keys": packing["keys"][:-1]})  # one block unaccounted for
    good = reply(2, client_update(strategy, MODALITIES, 1.0), client="good", modalities=MODALITIES)
    arrays, _ = strategy.aggregate_train(1, [bad, good])
    assert "malformed update" in strategy.round_record["train"]["rejected"]["bad"]
    assert strategy.round_record["train"]["trained"] == ["good"]
    assert all(torch.allclose(v, torch.ones_like(v)) for v in arrays.to_torch_state_dict().values())


def test_replies_checked_as_they_arrive_make_the_same_round_as_replies_checked_at_aggregation(tmp_path):
    def round_of(folder, early):
        strategy = make_strategy(folder, **{"min-clients": 1})
        nan = client_update(strategy, MODALITIES, 1.0)
        nan[next(iter(nan))] = torch.full_like(next(iter(nan.values())), float("nan"))
        replies = [
            reply(1, client_update(strategy, MODALITIES, 1.0), client="a", modalities=MODALITIES, n=10),
            reply(2, nan, client="bad", modalities=MODALITIES),
            reply(3, None, client="spent", modalities=MODALITIES, n=0, status=M.STATUS_BUDGET_EXHAUSTED),
            reply(4, client_update(strategy, ["image"], 3.0), client="b", modalities=["image"], n=30),
        ]
        for i, message in enumerate(replies):
            message.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower gives each reply
            if early:  # as PollingGrid.on_reply calls it: each reply as it comes in, before the round aggregates
                strategy.reply_arrived(message)
        assert strategy.site_name(1) == ("a" if early else "node 1")  # checked on arrival: its client is known
        arrays, _ = strategy.aggregate_train(1, replies)
        ledgers = sorted(p.name for p in (folder / "ledgers").iterdir()) if (folder / "ledgers").exists() else []
        return (
            arrays.to_torch_state_dict(),
            strategy.round_record["train"],
            strategy.state.clients,
            strategy.state.excluded,
            ledgers,
        )

    at_aggregation, as_arrived = round_of(tmp_path / "late", False), round_of(tmp_path / "early", True)
    assert as_arrived[1:] == at_aggregation[1:]
    assert as_arrived[1]["trained"] == ["a", "b"] and "non-finite" in as_arrived[1]["rejected"]["bad"]
    assert as_arrived[3] == {"spent"}
    assert all(torch.equal(as_arrived[0][k], v) for k, v in at_aggregation[0].items())


def test_a_client_that_raised_does_not_stop_the_round(tmp_path):
    strategy = make_strategy(tmp_path)
    request = Message(RecordDict({M.CONFIG: ConfigRecord({})}), dst_node_id=3, message_type="train")
    failed = Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ClientApp raised NonFiniteError"), reply_to=request
    )
    good = reply(2, client_update(strategy, MODALITIES, 1.0), client="good", modalities=MODALITIES)
    arrays, _ = strategy.aggregate_train(1, [failed, good])
    assert strategy.round_record["train"]["failed"] == {"node 3": M.FAILURE_SITE} and arrays is not None


def test_budget_exhausted_clients_are_excluded_from_later_rounds(tmp_path):
    strategy = make_strategy(tmp_path, **{"min-clients": 1})
    strategy.aggregate_train(
        1,
        [
            reply(1, None, client="spent", modalities=MODALITIES, n=0, status=M.STATUS_BUDGET_EXHAUSTED),
            reply(2, client_update(strategy, MODALITIES, 1.0), client="ok", modalities=MODALITIES),
        ],
    )
    assert strategy.state.excluded == {"spent"}
    assert strategy.state.clients["spent"]["status"] == "excluded: budget-exhausted"
    messages = list(strategy.configure_train(2, None, ConfigRecord(), FakeGrid([1, 2])))
    assert [m.metadata.dst_node_id for m in messages] == [2]
    sent = messages[0].content
    assert sent[M.CONFIG][M.SERVER_ROUND] == 2 and sent[M.CONFIG][M.PLANNED_ROUNDS] == 5


def test_a_client_whose_round_diverged_stays_in_the_federation(tmp_path):
    strategy = make_strategy(tmp_path, **{"min-clients": 1})
    strategy.aggregate_train(
        1,
        [
            reply(1, None, client="nan", modalities=MODALITIES, n=0, status=M.STATUS_DISCARDED),
            reply(2, client_update(strategy, MODALITIES, 1.0), client="ok", modalities=MODALITIES),
        ],
    )
    assert strategy.round_record["train"]["refused"] == {"nan": M.STATUS_DISCARDED} and strategy.round_record["train"][
        "trained"
    ] == ["ok"]
    assert strategy.state.excluded == set() and strategy.state.clients["nan"]["status"] == "active"
    assert sorted(m.metadata.dst_node_id for m in strategy.configure_train(2, None, ConfigRecord(), FakeGrid([1, 2]))) == [1, 2]


def test_the_federation_keeps_a_verified_copy_of_each_ledger(tmp_path):
    strategy = make_strategy(tmp_path)
    key, own = LedgerKey.generate(), Ledger(tmp_path / "client-ledger.jsonl")
    update = client_update(strategy, MODALITIES, 1.0)

    def entry(r, digest):
        return sign_round(own, key, r, digest)

    entry(1, M.update_digest(update))
    strategy.aggregate_train(
        1, [reply(1, update, client="c", modalities=MODALITIES, ledger=[encode_entry(e) for e in own.entries()])]
    )
    assert len(Ledger(tmp_path / "ledgers" / "c.jsonl").entries()) == 1
    # an update that differs from what the ledger says was sent is rejected
    entry(2, "0" * 64)
    strategy.aggregate_train(
        2, [reply(1, update, client="c", modalities=MODALITIES, ledger=[encode_entry(e) for e in own.entries()])]
    )
    assert "does not match the hash" in strategy.round_record["train"]["rejected"]["c"]
    # a ledger that drops an entry the federation holds is rejected
    strategy.aggregate_train(3, [reply(1, update, client="c", modalities=MODALITIES, ledger=[])])
    assert "truncated or rewritten" in strategy.round_record["train"]["rejected"]["c"]


def test_a_train_request_says_how_much_ledger_the_server_holds_and_a_delta_must_continue_it(tmp_path):
    # Prepare: client "c" on node 1 has sent its whole ledger (3 entries) once
    strategy = make_strategy(tmp_path)
    key, own = LedgerKey.generate(), Ledger(tmp_path / "client-ledger.jsonl")
    update = client_update(strategy, MODALITIES, 1.0)

    def entry(r):
        return sign_round(own, key, r, M.update_digest(update))

    def sent(entries):
        return [encode_entry(e) for e in entries]

    for r in (1, 2, 3):
        entry(r)
    strategy.aggregate_train(3, [reply(1, update, client="c", modalities=MODALITIES, ledger=sent(own.entries()))])
    copy = Ledger(tmp_path / "ledgers" / "c.jsonl")
    assert len(copy.entries()) == 3
    # Execute: the next train request names the copy's length and head
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(4, None, ConfigRecord(), FakeGrid([1, 2]))}
    request = messages[1].content[M.CONFIG]
    # Assert
    assert request[M.LEDGER_HELD] == 3 and request[M.LEDGER_HEAD] == own.entries()[2]["entry_hash"]
    # a delta (the held head + the new entry) is appended: the copy holds all four
    entry(4)
    strategy.aggregate_train(4, [reply(1, update, client="c", modalities=MODALITIES, ledger=sent(own.entries()[2:]))])
    assert copy.entries() == own.entries() and strategy._round["train"]["trained"] == ["c"]
    # a delta that leaves a gap (entry 5 missing) is refused, and nothing is recorded
    entry(5), entry(6)
    strategy.aggregate_train(6, [reply(1, update, client="c", modalities=MODALITIES, ledger=sent(own.entries()[5:]))])
    assert "start at 5" in strategy._round["train"]["rejected"]["c"] and len(copy.entries()) == 4
    # a delta whose first entry is not the head the copy holds (a rewritten history) is refused
    forged = dict(own.entries()[3], epsilon=0.5)
    strategy.aggregate_train(6, [reply(1, update, client="c", modalities=MODALITIES, ledger=sent([forged, *own.entries()[4:]]))])
    assert "truncated or rewritten" in strategy._round["train"]["rejected"]["c"] and len(copy.entries()) == 4
    # a node not yet known gets no ledger figures: its client sends its whole ledger
    assert M.LEDGER_HELD not in messages[2].content[M.CONFIG]


def test_fedadam_moves_by_the_server_learning_rate():
    opt = FedAdam(lr=0.1, beta1=0.0, beta2=0.0, tau=0.0)
    new = opt.step({"w": torch.zeros(3)}, {"w": torch.tensor([2.0, -1.0, 0.5])})
    assert torch.allclose(new["w"], torch.tensor([0.1, -0.1, 0.1]))  # sign(delta) * lr when beta = 0
    again = FedAdam(lr=0.1)
    again.load_state(opt.state())
    assert set(again.m) == {"w"}


def test_fedyogi_second_moment_moves_additively():
    # Prepare: no first-moment averaging and no tau, so the step is lr * delta / sqrt(v)
    opt, d = FedYogi(lr=0.1, beta1=0.0, beta2=0.5, tau=0.0), torch.tensor([2.0, -1.0])
    # Execute / Assert: v grows by (1 - beta2) d^2 while below d^2 (Adam: [3, 0.75] after two steps) ...
    first = opt.step({"w": torch.zeros(2)}, {"w": d})
    assert torch.allclose(opt.v["w"], torch.tensor([2.0, 0.5]))
    assert torch.allclose(first["w"], 0.1 * d / torch.tensor([2.0, 0.5]).sqrt())
    second = opt.step(first, {"w": first["w"] + d})
    assert torch.allclose(opt.v["w"], torch.tensor([4.0, 1.0]))
    # ... and shrinks by (1 - beta2) d^2 only after a small update (Adam would halve it)
    opt.step(second, {"w": second["w"] + 0.1 * d})
    assert torch.allclose(opt.v["w"], torch.tensor([4.0 - 0.02, 1.0 - 0.005]))
    assert isinstance(build_optimizer("fedyogi", 0.1), FedYogi) and parse_run_config({"strategy": "fedyogi"})


def test_a_sampled_federation_plans_each_clients_share_and_samples_no_client_beyond_it(tmp_path):
    # Prepare: 20 rounds, a fifth of 10 clients a round: each client's expected share is 4 rounds
    strategy = make_strategy(tmp_path, **{"num-server-rounds": 20, "fraction-train": 0.2, "min-clients": 1})
    strategy.state.total_rounds = 20
    strategy.node_clients = {n: f"c{n}" for n in range(1, 11)}
    strategy.state.clients = {f"c{n}": {"rounds_trained": 5 if n <= 8 else 2} for n in range(1, 11)}
    # Execute
    planned = strategy.train_request(1)[M.PLANNED_ROUNDS]
    sampled = {n for _ in range(20) for n in strategy.train_nodes(1, FakeGrid(range(1, 11)))}
    # Assert: announced plan ceil(1.25 x 20 x 0.2) = 5; clients that trained 5 rounds are never sampled again
    assert planned == 5 and sampled == {9, 10}
    # an explicit plan, and every round when every client trains every round
    assert make_strategy(tmp_path, participation=4, **{"fraction-train": 0.2}).train_request(1)[M.PLANNED_ROUNDS] == 4
    assert make_strategy(tmp_path).train_request(1)[M.PLANNED_ROUNDS] == 5  # the run's 5 rounds
    with pytest.raises(ConfigError, match="participation"):
        parse_run_config({"participation": 11})


def test_evaluation_means_are_weighted_per_subset():
    a = EvaluateReply(
        1,
        "a",
        10,
        {"accuracy": 1.0, "macro-f1": 1.0, "loss": 0.0},
        {"image": {"accuracy": 1.0, "macro-f1": 1.0, "num-examples": 10}},
    )
    b = EvaluateReply(
        2,
        "b",
        30,
        {"accuracy": 0.5, "macro-f1": 0.5, "loss": 1.0},
        {
            "image": {"accuracy": 0.0, "macro-f1": 0.0, "num-examples": 10},
            "signal": {"accuracy": 0.6, "macro-f1": 0.6, "num-examples": 30},
        },
    )
    out = mean_metrics([a, b])
    assert out["accuracy"] == pytest.approx(0.625) and out["num_examples"] == 40
    assert out["by_modalities"]["image"]["accuracy"] == pytest.approx(0.5)
    assert out["by_modalities"]["signal"] == {"accuracy": 0.6, "macro_f1": 0.6, "num_examples": 30}


def test_end_of_round_writes_a_checkpoint_and_results_that_resume_reads(tmp_path):
    strategy = make_strategy(tmp_path)
    strategy.aggregate_train(1, [reply(1, client_update(strategy, MODALITIES, 1.0), client="c", modalities=MODALITIES)])
    strategy.end_round(1, None)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "running" and [r["round"] for r in results["rounds"]] == [1]
    assert results["privacy"]["clients"]["c"]["rounds_trained"] == 1
    checkpoint = RunFolder(tmp_path).load_checkpoint()
    assert checkpoint.round == 1
    assert all(torch.equal(checkpoint.global_state[k], v) for k, v in strategy.state.global_state.items())
    assert checkpoint.record["clients"]["c"]["rounds_trained"] == 1


def test_a_run_folder_refuses_a_different_configuration(tmp_path):
    folder = RunFolder(tmp_path)
    flat = RunConfig().to_flat()
    run_id = folder.open_run(flat)
    assert folder.open_run(flat | {"out-dir": "elsewhere"}) == run_id
    with pytest.raises(Exception, match=r"different configuration \(dp.epsilon = 1.0, the stored run has 8.0\)"):
        folder.open_run(flat | {"dp.epsilon": 1.0})


def test_a_run_started_before_a_config_key_existed_resumes_while_the_key_holds_its_default(tmp_path):
    # Prepare: a run folder written by a fedfuse that did not know "train.momentum" yet
    flat = RunConfig().to_flat()
    old = RunFolder(tmp_path / "old")
    run_id = old.open_run({k: v for k, v in flat.items() if k != "train.momentum"})
    # Execute / Assert: today's config (the key at its default) continues that run; another value does not
    assert old.open_run(flat) == run_id
    with pytest.raises(Exception, match="train.momentum = 0.1, not set when the run started"):
        old.open_run(flat | {"train.momentum": 0.1})


def test_heldout_sites_are_scored_per_site_and_pooled(tmp_path):
    from common.data import synthetic
    from common.data.site_folders import write_site
    from common.model.multimodal import MultimodalModel
    from server.heldout import HeldoutEvaluator

    data = synthetic.generate(30, seed=5)
    write_site(tmp_path / "a", data, ["train"] * 20 + ["test"] * 10, name="a")  # a training site: not scored
    write_site(tmp_path / "b", data, ["test"] * 30, name="b")
    write_site(tmp_path / "c", data.restrict(["image"]), ["test"] * 30, name="c")
    config = parse_run_config(RunConfig().to_flat() | {"encoders": "federated", "data.server-test": str(tmp_path)})
    model = MultimodalModel(
        data.schema, ModelConfig(config.model.fusion, config.model.embed_dim, config.model.hidden_dim), seed=0
    )
    report = HeldoutEvaluator(config)(model.state_dict())
    assert report["num_examples"] == 60 and set(report["clients"]) == {"b", "c"}
    assert report["pooled"]["num_examples"] == 60
    assert report["pooled"]["accuracy"] == pytest.approx(report["client_mean"]["accuracy"])  # = weighted mean
    assert "image+signal+tabular" in report["pooled"]["by_modalities"]
    # without any trained encoder there is no whole model to score
    assert HeldoutEvaluator(config)({k: v for k, v in model.state_dict().items() if k.startswith("head.")}) is None


def test_the_run_log_names_idle_sites_and_knobs_that_alter_real_data(tmp_path, caplog):
    from common.data import synthetic
    from common.data.site_folders import write_site
    from server.server_app import _data_notes

    data = synthetic.generate(30, seed=5)
    write_site(tmp_path / "a", data, ["train"] * 20 + ["test"] * 10, name="a")
    write_site(tmp_path / "b", data, ["test"] * 30, name="b")
    config = parse_run_config(RunConfig().to_flat() | {"data.dataset": str(tmp_path), "data.missing-rate": 0.2})
    with caplog.at_level("WARNING", logger="fedfuse.server"):
        notes = _data_notes(config)
    assert list(notes["sites_not_training"]) == ["b"] and len(notes["data_changes"]) == 1
    assert "site 'b' takes no part in this run: no 'train' split" in caplog.text
    assert "the run alters the sites' real data: data.missing-rate = 0.2" in caplog.text
    assert _data_notes(parse_run_config(RunConfig().to_flat())) == {}  # synthetic data: nothing to say
    # a plan that drowns the signal is warned about before the first round
    tiny = parse_run_config(RunConfig().to_flat() | {"data.dataset": str(tmp_path), "dp.epsilon": 0.5, "num-server-rounds": 50})
    with caplog.at_level("WARNING", logger="fedfuse.server"):
        assert "drown the signal at 1 of 1 site(s)" in _data_notes(tiny)["plan_warning"]
    assert "`fedfuse plan` suggests" in caplog.text


def evaluate_reply(node, *, client, metrics, status=M.STATUS_OK):
    request = Message(RecordDict({M.CONFIG: ConfigRecord({})}), dst_node_id=node, message_type="evaluate")
    ident = {M.CLIENT_ID: client, M.MODALITIES: MODALITIES, M.STATUS: status}
    return Message(RecordDict({M.METRICS: MetricRecord(metrics), M.CLIENT: ConfigRecord(ident)}), reply_to=request)


def test_a_site_that_refused_the_run_adds_nothing_to_the_evaluation(tmp_path):
    strategy = make_strategy(tmp_path)
    scored = {M.NUM_EXAMPLES: 20, M.ACCURACY: 0.5, M.MACRO_F1: 0.4, M.LOSS: 1.0}
    strategy.aggregate_evaluate(
        1,
        [
            evaluate_reply(1, client="ok", metrics=scored),
            evaluate_reply(2, client="refuser", metrics={M.NUM_EXAMPLES: 0}, status=M.STATUS_POLICY_REFUSED),
        ],
    )
    summary, outcome = strategy.round_record["evaluate"], strategy.round_record["evaluate_replies"]
    assert set(summary["clients"]) == {"ok"} and summary["num_examples"] == 20
    assert outcome == {"evaluated": ["ok"], "refused": {"refuser": M.STATUS_POLICY_REFUSED}, "rejected": {}, "failed": {}}
    # a refusal that still carries metrics is not taken into the results
    strategy.aggregate_evaluate(2, [evaluate_reply(2, client="refuser", metrics=scored, status=M.STATUS_POLICY_REFUSED)])
    assert strategy.round_record["evaluate"] is None and "refuser" in strategy.round_record["evaluate_replies"]["rejected"]


def test_failures_are_recorded_by_site_name_with_a_category(tmp_path):
    strategy = make_strategy(tmp_path)
    failed = reply(4, None, client="berlin", modalities=[], n=0, status=M.STATUS_FAILED)
    failed.content[M.CLIENT] = ConfigRecord(dict(failed.content[M.CLIENT]) | {M.REASON: M.FAILURE_SITE})
    anonymous = reply(5, None, client="", modalities=[], n=0, status=M.STATUS_FAILED)
    request = Message(RecordDict({M.CONFIG: ConfigRecord({})}), dst_node_id=6, message_type="train")
    silent = Message(Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason="no reply within 5 s"), reply_to=request)
    request = Message(RecordDict({M.CONFIG: ConfigRecord({})}), dst_node_id=7, message_type="train")
    untrusted = Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="<class 'UntrustedAppError'>:<'fedfuse-untrusted-app: ...'>"),
        reply_to=request,
    )
    strategy.node_clients[6] = "paris"  # known from an earlier reply
    good = reply(2, client_update(strategy, MODALITIES, 1.0), client="good", modalities=MODALITIES)
    strategy.aggregate_train(1, [failed, anonymous, silent, untrusted, good])
    assert strategy.round_record["train"]["failed"] == {
        "berlin": M.FAILURE_SITE,
        "node 5": M.FAILURE_SITE,
        "node 7": M.FAILURE_APP_REFUSED,
        "paris": M.FAILURE_NO_REPLY,
    }
    assert strategy.round_record["train"]["trained"] == ["good"] and strategy.state.excluded == set()
    assert "berlin" not in strategy.state.clients  # a failure is no privacy record


@pytest.mark.parametrize(
    "setup, shown",
    [
        ("", True),  # as Flower's flwr-serverapp starts a deployed ServerApp: nothing configures logging
        ("from common.logs import setup_logging; setup_logging(quiet=True); ", False),  # fedfuse simulate --quiet
    ],
    ids=["deployed", "quiet-simulation"],
)
def test_the_serverapp_shows_its_progress_unless_logging_was_set_up_quiet(setup, shown):
    import subprocess
    import sys

    # Prepare: a fresh process; importing the ServerApp imports Opacus, whose logging.basicConfig puts a WARNING
    # handler on the root logger
    code = (
        f"import logging, server.server_app as s; assert logging.getLogger().handlers; {setup}s._show_progress(); "
        "logging.getLogger('fedfuse.server').info('round 1/1 | progress'); "
        "logging.getLogger('fedfuse.server').warning('a warning')"
    )
    # Execute
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    # Assert: fedfuse's INFO line reaches stderr (the run's log) unless set up quiet; a warning is printed once
    line = "INFO fedfuse.server: round 1/1 | progress"
    assert (line in done.stderr) is shown and ("progress" in done.stderr) is shown
    assert done.stderr.count("a warning") == 1


def test_a_rounds_epsilon_row_holds_the_clients_that_answered_it_not_every_client_known(tmp_path):
    from common.insight.plots import plot_epsilon

    # Prepare: a and b train in round 1, b alone in round 2, c refuses (out of budget) in round 3
    strategy = make_strategy(tmp_path, **{"min-clients": 1})
    update = lambda: client_update(strategy, MODALITIES, 1.0)  # noqa: E731
    rounds = [
        [reply(1, update(), client="a", modalities=MODALITIES), reply(2, update(), client="b", modalities=MODALITIES)],
        [reply(2, update(), client="b", modalities=MODALITIES, metrics={M.EPSILON: 2.0})],
        [reply(3, None, client="c", modalities=MODALITIES, n=0, status=M.STATUS_BUDGET_EXHAUSTED, metrics={M.EPSILON: 8.0})],
    ]
    # Execute
    for r, replies in enumerate(rounds, start=1):
        strategy.train_nodes(r, FakeGrid([1, 2, 3]))
        strategy.aggregate_train(r, replies)
        strategy.end_round(r, None)
    # Assert: each row names only the clients whose spend could change in it; the maximum is over all known
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["epsilon"] for r in results["rounds"]] == [{"a": 1.0, "b": 1.0}, {"b": 2.0}, {"c": 8.0}]
    assert [r["max_epsilon"] for r in results["rounds"]] == [1.0, 2.0, 8.0]
    assert {c: v["epsilon"] for c, v in results["privacy"]["clients"].items()} == {"a": 1.0, "b": 2.0, "c": 8.0}
    assert [r["seconds"] > 0 for r in results["rounds"]] == [True] * 3
    assert plot_epsilon(results, tmp_path / "epsilon.png").stat().st_size > 0  # a's line carried to round 3


def test_results_json_is_written_as_before_with_each_round_row_serialized_once(tmp_path, monkeypatch):
    import server.run_folder
    from common.fileio import atomic_write_json, json_safe

    # Prepare: count what the writer serializes; rows with NaN, infinity, non-ASCII and nesting
    dumped = []
    real = server.run_folder._dumps
    monkeypatch.setattr(server.run_folder, "_dumps", lambda value: dumped.append(value) or real(value))
    folder, rows = RunFolder(tmp_path / "run"), []
    (tmp_path / "run").mkdir()

    def results(status):
        return {"run_id": "r", "status": status, "rounds": rows, "final": rows[-1] if rows else None, "note": "ε δ"}

    def reference(status):  # what results.json held before: the whole dict serialized at every rewrite
        atomic_write_json(tmp_path / "reference.json", json_safe(results(status)))
        return (tmp_path / "reference.json").read_bytes()

    # Execute / Assert: byte for byte the same file after each round; each row serialized once, when new
    for r in range(1, 5):
        assert (tmp_path / "run" / "results.json").exists() == (r > 1)
        folder.write_results(results("running"))
        assert (tmp_path / "run" / "results.json").read_bytes() == reference("running")
        rows.append({"round": r, "loss": float("nan") if r == 2 else 1.0 / r, "max_epsilon": float("inf"), "by": {"ε": [r]}})
        dumped.clear()
        folder.write_results(results("running"))
        assert (tmp_path / "run" / "results.json").read_bytes() == reference("running")
        assert sum(1 for value in dumped if value in rows) == 1  # the new row only
    rows[1] = dict(rows[1], loss=0.5)  # a row replaced by another object is serialized again
    folder.write_results(results("completed"))
    assert (tmp_path / "run" / "results.json").read_bytes() == reference("completed")
    RunFolder(tmp_path / "run").write_results(results("completed"))  # a resumed run's first write: every row
    assert (tmp_path / "run" / "results.json").read_bytes() == reference("completed")


def test_the_strategy_never_changes_a_round_row_once_written(tmp_path):
    # Rows are serialized once (RunFolder.write_results): results.json must equal the strategy's results in memory
    from common.fileio import json_safe

    strategy = make_strategy(tmp_path, **{"min-clients": 1})
    scored = {M.NUM_EXAMPLES: 20, M.ACCURACY: 0.5, M.MACRO_F1: 0.4, M.LOSS: 1.0}
    for r in (1, 2, 3):
        strategy.train_nodes(r, FakeGrid([1, 2]))
        updates = [reply(n, client_update(strategy, MODALITIES, 1.0), client=f"c{n}", modalities=MODALITIES) for n in (1, 2)]
        strategy.aggregate_train(r, updates if r != 2 else updates[:1])
        strategy.aggregate_evaluate(r, [evaluate_reply(n, client=f"c{n}", metrics=scored) for n in (1, 2)])
        strategy.end_round(r, None)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(json_safe(strategy.results(status="running"))))  # 3 of 5 rounds
    assert [row["round"] for row in written["rounds"]] == [1, 2, 3]


def test_each_checkpoint_keeps_its_own_round_and_resume_reads_every_round_back(tmp_path):
    # Prepare / Execute: three rounds, a checkpoint after each
    strategy = make_strategy(tmp_path, **{"min-clients": 1})
    for r in (1, 2, 3):
        strategy.train_nodes(r, FakeGrid([1]))
        strategy.aggregate_train(r, [reply(1, client_update(strategy, MODALITIES, 1.0), client="c", modalities=MODALITIES)])
        strategy.end_round(r, None)
    # Assert: a checkpoint's file holds its own round's row (not every row so far); resume gets results.json's rows
    folder = tmp_path / "checkpoints"
    assert [[x["round"] for x in json.loads((folder / f"round-000{r}.json").read_text())["rounds"]] for r in (1, 2, 3)] == [
        [1],
        [2],
        [3],
    ]
    results = json.loads((tmp_path / "results.json").read_text())
    assert RunFolder(tmp_path).load_checkpoint().record["rounds"] == results["rounds"]
    # A folder written before (every row in each checkpoint) resumes the same
    (folder / "round-0003.json").write_text(json.dumps({"round": 3, "run_id": "run-x", "rounds": results["rounds"]}))
    assert RunFolder(tmp_path).load_checkpoint().record["rounds"] == results["rounds"]
    # A round's checkpoint gone: a clear error, not a run resumed without that round's results
    (folder / "round-0003.json").write_text(json.dumps({"round": 3, "run_id": "run-x", "rounds": results["rounds"][-1:]}))
    (folder / "round-0002.json").unlink()
    with pytest.raises(FedfuseError, match="round-0002.json is missing"):
        RunFolder(tmp_path).load_checkpoint()


def test_the_server_verifies_its_ledger_copy_once_and_again_only_when_the_file_changed(tmp_path, monkeypatch):
    import common.privacy.ledger as ledger_module

    # Prepare: client "c" trains rounds 1-3, sending the entries the server lacks each round
    strategy = make_strategy(tmp_path)
    key, own = LedgerKey.generate(), Ledger(tmp_path / "client-ledger.jsonl")
    update = client_update(strategy, MODALITIES, 1.0)
    full_checks = []
    real_check = ledger_module.check_chain

    def counting(entries, **kwargs):
        if kwargs.get("verified", 0) == 0 and entries:
            full_checks.append(len(entries))
        return real_check(entries, **kwargs)

    monkeypatch.setattr(ledger_module, "check_chain", counting)

    def train(r):
        sign_round(own, key, r, M.update_digest(update))
        entries = own.entries()
        strategy.aggregate_train(
            r, [reply(1, update, client="c", modalities=MODALITIES, ledger=[encode_entry(e) for e in entries[max(r - 2, 0) :]])]
        )
        return strategy.round_record["train"]

    # Execute + Assert: the copy written in round 1 is not read and verified again in rounds 2 and 3
    assert [train(r)["trained"] for r in (1, 2)] == [["c"], ["c"]]
    full_checks.clear()
    assert train(3)["trained"] == ["c"] and full_checks == []
    assert len(Ledger(tmp_path / "ledgers" / "c.jsonl").entries()) == 3
    # a copy edited on disk is read and verified again, and the edit is caught
    path = tmp_path / "ledgers" / "c.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1] + [lines[-1].replace('"epsilon":3.0', '"epsilon":0.5')]) + "\n")
    assert "does not verify" in train(4)["rejected"]["c"]
