"""Client handlers, called directly with constructed Flower messages."""

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.handlers import handle_evaluate, handle_train
from common import messages as M
from common.config import RunConfig
from common.data import synthetic
from common.data.site_folders import write_site
from common.model.multimodal import ModelConfig, global_head_template
from common.privacy.audit import audit_path
from common.privacy.ledger import Ledger, verify_chain

pytestmark = pytest.mark.usefixtures("task_identity")


def run_config(tmp_path, **overrides):
    flat = RunConfig().to_flat() | {"out-dir": str(tmp_path), "data.samples-per-client": 300, "train.batch-size": 60} | overrides
    return flat


def global_head(flat=None):
    fusion = (flat or {}).get("model.fusion", "attention")
    return global_head_template(["image", "signal", "tabular"], 6, ModelConfig(fusion))


def train_message(head, server_round=1, planned=3, run_id="run-a", **request):
    config = ConfigRecord({M.SERVER_ROUND: server_round, M.RUN_ID: run_id, M.PLANNED_ROUNDS: planned} | request)
    return Message(RecordDict({**M.pack_arrays(head), M.CONFIG: config}), dst_node_id=11, message_type="train")


def context(flat, node_config=None):
    return Context(
        run_id=5,
        node_id=11,
        node_config=node_config or {"partition-id": 0, "num-partitions": 6},
        state=RecordDict(),
        run_config=flat,
    )


def deployed_site(tmp_path, folder="site", **node):
    """A deployed site "hospital-a" (50 train, 10 test samples) in ``tmp_path / folder``: (its folder, its node
    config with the policy max-epsilon = 4 unless ``node`` says otherwise)."""
    site = write_site(tmp_path / folder, synthetic.generate(60, seed=1), ["train"] * 50 + ["test"] * 10, name="hospital-a")
    config = {"data-dir": str(site), "state-dir": str(tmp_path / "state"), "max-epsilon": 4.0, "num-train-examples": 50}
    return site, config | node


def test_train_reply_carries_the_head_only(tmp_path):
    flat = run_config(tmp_path)
    reply = handle_train(train_message(global_head()), context(flat))
    arrays = M.unpack_arrays(reply.content)
    assert arrays and all(k.startswith("head.") for k in arrays)
    assert set(arrays) == set(global_head())  # client 0 holds every modality
    metrics, ident = reply.content[M.METRICS], reply.content[M.CLIENT]
    assert ident[M.STATUS] == M.STATUS_OK and ident[M.CLIENT_ID] == "client-00"
    assert 0 < metrics[M.EPSILON] <= metrics[M.BUDGET] == 8.0
    assert M.TRAIN_LOSS not in metrics  # private, not released by default
    # the client's state and ledger are on disk; the ledger entry matches the update sent
    folder = tmp_path / "clients" / "client-00"
    assert {"privacy.json", "model.safetensors", "ledger.jsonl"} <= {p.name for p in folder.iterdir()}
    entries = Ledger(folder / "ledger.jsonl").entries()
    assert verify_chain(entries) == [] and entries[-1]["update_hash"] == M.update_digest(arrays)
    assert len(ident[M.LEDGER]) == 1


def test_a_client_missing_modalities_sends_only_its_blocks(tmp_path):
    flat = run_config(tmp_path)
    reply = handle_train(train_message(global_head()), context(flat, {"partition-id": 4, "num-partitions": 6}))
    keys = set(M.unpack_arrays(reply.content))
    assert reply.content[M.CLIENT][M.MODALITIES] == ["image"]
    assert {k.split(".")[2] for k in keys if k.startswith("head.blocks.")} == {"image"}
    assert any(k.startswith("head.core.") for k in keys)


def test_federated_encoders_are_sent_only_when_configured(tmp_path):
    flat = run_config(tmp_path, encoders="federated")
    reply = handle_train(train_message(global_head()), context(flat, {"partition-id": 2, "num-partitions": 6}))
    keys = set(M.unpack_arrays(reply.content))
    assert {k.split(".")[1] for k in keys if k.startswith("encoders.")} == {"signal", "tabular"}


def test_the_same_round_is_never_trained_twice(tmp_path):
    flat = run_config(tmp_path)
    first = handle_train(train_message(global_head()), context(flat))
    again = handle_train(train_message(global_head()), context(flat))
    a, b = (M.unpack_arrays(r.content) for r in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a)
    import json

    privacy = json.loads((tmp_path / "clients" / "client-00" / "privacy.json").read_text())
    assert len(privacy["privacy"]["history"]) == 1 and privacy["rounds"] == [["run-a", 1]]


def test_a_reply_carries_the_ledger_from_the_head_the_server_holds(tmp_path):
    flat = run_config(tmp_path, **{"num-server-rounds": 4})
    path = tmp_path / "clients" / "client-00" / "ledger.jsonl"
    sent = lambda reply: [json.loads(e) for e in reply.content[M.CLIENT][M.LEDGER]]  # noqa: E731
    assert [e["index"] for e in sent(handle_train(train_message(global_head(), 1, planned=4), context(flat)))] == [0]
    head = Ledger(path).entries()[0]["entry_hash"]
    # the server holds entry 0: the reply carries entry 0 (its head, checked there) and the new entry 1
    reply = handle_train(train_message(global_head(), 2, planned=4, **{M.LEDGER_HELD: 1, M.LEDGER_HEAD: head}), context(flat))
    assert [e["index"] for e in sent(reply)] == [0, 1] and sent(reply) == Ledger(path).entries()
    # a request whose head is not this ledger's (another client's, a forked copy): the whole ledger goes
    reply = handle_train(train_message(global_head(), 3, planned=4, **{M.LEDGER_HELD: 2, M.LEDGER_HEAD: "0" * 64}), context(flat))
    assert [e["index"] for e in sent(reply)] == [0, 1, 2]


def test_a_round_verifies_the_ledger_once_and_a_tampered_ledger_stops_it_before_training(tmp_path, monkeypatch):
    import common.privacy.ledger

    flat = run_config(tmp_path, **{"num-server-rounds": 3})
    folder = tmp_path / "clients" / "client-00"
    handle_train(train_message(global_head(), 1), context(flat))
    full_checks = []
    real_check = common.privacy.ledger.check_chain

    def counting(entries, **kwargs):
        if kwargs.get("verified", 0) == 0 and entries:
            full_checks.append(len(entries))
        return real_check(entries, **kwargs)

    monkeypatch.setattr(common.privacy.ledger, "check_chain", counting)
    # one verification of the whole chain a round; the new entry is checked against it alone
    assert handle_train(train_message(global_head(), 2), context(flat)).content[M.CLIENT][M.STATUS] == M.STATUS_OK
    assert full_checks == [1]
    # Execute: entry 1's epsilon is edited in the file, then round 3 comes
    lines = (folder / "ledger.jsonl").read_text().splitlines()
    edited = json.loads(lines[1]) | {"epsilon": 0.01}
    (folder / "ledger.jsonl").write_text("\n".join([lines[0], json.dumps(edited, sort_keys=True, separators=(",", ":"))]) + "\n")
    history = json.loads((folder / "privacy.json").read_text())["privacy"]["history"]
    with pytest.raises(common.privacy.ledger.LedgerError, match="does not verify"):
        handle_train(train_message(global_head(), 3), context(flat))
    # Assert: caught before the data was used: nothing trained, nothing charged, nothing appended
    assert json.loads((folder / "privacy.json").read_text())["privacy"]["history"] == history
    assert len((folder / "ledger.jsonl").read_text().splitlines()) == 2


def test_budget_exhausted_client_replies_with_a_status_and_no_update(tmp_path):
    flat = run_config(tmp_path)
    for r in (1, 2):
        assert handle_train(train_message(global_head(), r, planned=2), context(flat)).content[M.CLIENT][M.STATUS] == "ok"
    reply = handle_train(train_message(global_head(), 3, planned=2), context(flat))
    assert reply.content[M.CLIENT][M.STATUS] == M.STATUS_BUDGET_EXHAUSTED
    assert M.ARRAYS not in reply.content.array_records
    assert "over the budget" in reply.content[M.CLIENT][M.REASON]
    entries = Ledger(tmp_path / "clients" / "client-00" / "ledger.jsonl").entries()
    assert [e["status"] for e in entries] == ["trained", "trained", "refused-budget"]
    assert verify_chain(entries) == []


def test_non_private_run_reports_infinite_epsilon(tmp_path):
    flat = run_config(tmp_path, **{"dp.epsilon": math.inf})
    reply = handle_train(train_message(global_head()), context(flat))
    assert math.isinf(reply.content[M.METRICS][M.EPSILON])


def test_evaluate_reports_overall_and_per_subset_metrics(tmp_path):
    flat = run_config(tmp_path)
    reply = handle_evaluate(train_message(global_head()), context(flat, {"partition-id": 1, "num-partitions": 6}))
    metrics = dict(reply.content[M.METRICS])
    assert metrics[M.NUM_EXAMPLES] == 60
    assert {"by.image.accuracy", "by.signal.accuracy", "by.image+signal.accuracy", "by.image+signal.num-examples"} <= set(metrics)
    assert not any(k.startswith("by.tabular") for k in metrics)
    hidden = handle_evaluate(train_message(global_head()), context(run_config(tmp_path, **{"release.eval-metrics": False})))
    assert dict(hidden.content[M.METRICS]) == {M.NUM_EXAMPLES: 0}


def test_a_deployed_site_refuses_a_run_asking_for_more_than_its_policy(tmp_path):
    _, node = deployed_site(tmp_path)
    reply = handle_train(train_message(global_head()), context(run_config(tmp_path, **{"dp.epsilon": 8.0}), node))
    assert reply.content[M.CLIENT][M.STATUS] == M.STATUS_POLICY_REFUSED
    assert "allows at most ε = 4" in reply.content[M.CLIENT][M.REASON]
    assert not (tmp_path / "state" / "privacy.json").exists()  # nothing trained, nothing spent
    ok = handle_train(train_message(global_head()), context(run_config(tmp_path, **{"dp.epsilon": 3.0}), node))
    assert ok.content[M.CLIENT][M.STATUS] == M.STATUS_OK and ok.content[M.CLIENT][M.CLIENT_ID] == "hospital-a"


class Killed(BaseException):
    """Stands in for SIGKILL at one point of a round (BaseException: nothing in the handler catches it)."""


def test_a_crash_between_the_privacy_record_and_the_ledger_loses_no_entry(tmp_path, monkeypatch):
    # Prepare: round 2 is charged to privacy.json, then the process dies before its ledger entry is signed
    flat = run_config(tmp_path)
    folder = tmp_path / "clients" / "client-00"
    handle_train(train_message(global_head(), 1), context(flat))
    real_append = Ledger.append

    def die(self, fields, key):
        raise Killed

    monkeypatch.setattr(Ledger, "append", die)
    with pytest.raises(Killed):
        handle_train(train_message(global_head(), 2), context(flat))
    monkeypatch.setattr(Ledger, "append", real_append)
    assert len(Ledger(folder / "ledger.jsonl").entries()) == 1  # the spend of round 2 is not in the ledger yet
    # Execute: the server resends round 2 after the restart (its update never arrived), then round 3
    again = handle_train(train_message(global_head(), 2), context(flat))
    handle_train(train_message(global_head(), 3), context(flat))
    # Assert: round 2 is not retrained; its entry was recovered and its update (staged before the charge) is sent,
    # the one the entry names; every recorded epsilon is explained
    assert again.content[M.CLIENT][M.STATUS] == M.STATUS_OK
    entries = Ledger(folder / "ledger.jsonl").entries()
    assert [(e["round"], e["status"]) for e in entries] == [(1, "trained"), (2, "trained"), (3, "trained")]
    assert M.update_digest(M.unpack_arrays(again.content)) == entries[1]["update_hash"]
    report = audit_path(folder / "ledger.jsonl")
    assert report.exit_status == 0, report.to_json()


def test_a_round_makes_its_privacy_record_durable_first_and_everything_durable_before_it_replies(tmp_path, monkeypatch):
    import os

    import client.state
    import common.fileio

    flat = run_config(tmp_path)
    handle_train(train_message(global_head(), 1), context(flat))
    events = []
    real_replace, real_fsync_dir = os.replace, common.fileio.fsync_dir
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", os.path.basename(b))) or real_replace(a, b))
    for module in (common.fileio, client.state):
        monkeypatch.setattr(module, "fsync_dir", lambda d: events.append(("sync", "")) or real_fsync_dir(d))
    # Execute
    reply = handle_train(train_message(global_head(), 2), context(flat))
    # Assert: privacy.json's rename is durable before the ledger's; nothing is renamed after the last folder sync
    assert reply.content[M.CLIENT][M.STATUS] == M.STATUS_OK
    renames = [name for kind, name in events if kind == "rename"]
    assert renames == ["model.staged.safetensors", "privacy.json", "ledger.jsonl", "model.safetensors"]
    first = events.index(("rename", "privacy.json"))
    assert events[first + 1] == ("sync", "") and events[-1] == ("sync", "")
    assert len([e for e in events if e[0] == "sync"]) == 2  # one for privacy.json (the staged model's rename with it),
    # one for the ledger and the model


@pytest.mark.parametrize(
    "dies_in, resent",
    [
        ("stage_trained", False),  # before the charge: nothing of round 2 is on record, it trains again
        ("commit_trained", True),  # after the charge and the ledger entry: its staged update is sent again
    ],
)
def test_a_crash_around_the_charge_loses_no_update_and_charges_no_round_twice(tmp_path, monkeypatch, dies_in, resent):
    # Prepare: the process dies while staging round 2's model (before its charge), or while making it the model
    # (after the charge): the two sides of the window in which a round's update used to be lost
    from client.state import ClientState

    flat = run_config(tmp_path)
    folder = tmp_path / "clients" / "client-00"
    handle_train(train_message(global_head(), 1), context(flat))
    real = getattr(ClientState, dies_in)

    def die(self, *args, **kwargs):
        if dies_in == "stage_trained":
            real(self, *args, **kwargs)  # the staged file is written, the charge is not
        raise Killed

    monkeypatch.setattr(ClientState, dies_in, die)
    with pytest.raises(Killed):
        handle_train(train_message(global_head(), 2), context(flat))
    monkeypatch.setattr(ClientState, dies_in, real)
    charged = len(Ledger(folder / "ledger.jsonl").entries())
    # Execute: the server asks for round 2 again (its update never arrived), then round 3
    again = handle_train(train_message(global_head(), 2), context(flat))
    third = handle_train(train_message(global_head(), 3), context(flat))
    # Assert: round 2 charged once (trained again only if it was not charged), its update the one its entry names
    assert charged == (2 if resent else 1)
    assert again.content[M.CLIENT][M.STATUS] == third.content[M.CLIENT][M.STATUS] == M.STATUS_OK
    entries = Ledger(folder / "ledger.jsonl").entries()
    assert [(e["round"], e["status"]) for e in entries] == [(1, "trained"), (2, "trained"), (3, "trained")]
    assert M.update_digest(M.unpack_arrays(again.content)) == entries[1]["update_hash"]
    cached, _ = ClientState(folder).load_reply(run_id="run-a", server_round=3)
    assert M.update_digest(cached) == entries[-1]["update_hash"] == M.update_digest(M.unpack_arrays(third.content))
    assert not (folder / "model.staged.safetensors").exists()
    assert audit_path(folder / "ledger.jsonl").exit_status == 0


def test_a_failed_round_is_charged_in_the_ledger_as_discarded(tmp_path):
    # Prepare: a clipping norm so large that, with a huge learning rate, the noised update overflows
    flat = run_config(tmp_path, **{"dp.max-grad-norm": 1e3})
    folder = tmp_path / "clients" / "client-00"
    handle_train(train_message(global_head(), 1), context(flat))
    # Execute
    failed = handle_train(train_message(global_head(), 2), context(flat | {"train.lr": 1e38}))
    handle_train(train_message(global_head(), 3), context(flat))
    # Assert: the failed round used the data, so its steps are on record; it sent nothing; the audit agrees
    ident = failed.content[M.CLIENT]
    assert ident[M.STATUS] == M.STATUS_DISCARDED and "discarded" in ident[M.REASON]
    assert M.ARRAYS not in failed.content.array_records and len(ident[M.LEDGER]) == 2  # the server gets the entry
    entries = Ledger(folder / "ledger.jsonl").entries()
    assert [(e["round"], e["status"]) for e in entries] == [(1, "trained"), (2, "discarded"), (3, "trained")]
    assert entries[1]["mechanism"]["steps"] == entries[0]["mechanism"]["steps"] > 0
    assert entries[1]["update_hash"] is None and entries[0]["epsilon"] < entries[1]["epsilon"] < entries[2]["epsilon"]
    report = audit_path(folder / "ledger.jsonl")
    assert report.exit_status == 0, report.to_json()
    assert [c.discarded_rounds for c in report.clients.values()] == [1]


def test_parameters_travel_as_one_packed_array_and_a_bad_packing_is_refused():
    head = global_head()
    content = RecordDict(M.pack_arrays(head))
    assert list(content.array_records[M.ARRAYS]) == [M.PACKED]  # one array, one request per hop in a deployment
    back = M.unpack_arrays(content)
    assert list(back) == list(head) and all(torch.equal(back[k], head[k]) for k in head)
    flat = content.array_records[M.ARRAYS].to_torch_state_dict()[M.PACKED]
    bad_cases = [
        ({"keys": list(head)[:-1]}, "does not describe the whole array"),
        ({"keys": [list(head)[0]] * len(head)}, "repeated key"),
        ({"shapes": [1, 10**9] + list(content.config_records[M.PACKING]["shapes"])[2:]}, "more values"),
    ]
    for change, match in bad_cases:
        packing = dict(content.config_records[M.PACKING]) | change
        bad = RecordDict({M.ARRAYS: content.array_records[M.ARRAYS], M.PACKING: ConfigRecord(packing)})
        with pytest.raises(ValueError, match=match):
            M.unpack_arrays(bad)
    with pytest.raises(ValueError, match="without its 'packing'"):
        M.unpack_arrays(RecordDict({M.ARRAYS: content.array_records[M.ARRAYS]}))
    assert flat.dim() == 1 and M.unpack_arrays(RecordDict({})) == {}


def test_a_site_that_refused_the_run_evaluates_nothing(tmp_path):
    _, node = deployed_site(tmp_path)
    refused = handle_evaluate(train_message(global_head()), context(run_config(tmp_path, **{"dp.epsilon": 8.0}), node))
    assert dict(refused.content[M.METRICS]) == {M.NUM_EXAMPLES: 0}  # nothing computed from its data
    assert refused.content[M.CLIENT][M.STATUS] == M.STATUS_POLICY_REFUSED
    ok = handle_evaluate(train_message(global_head()), context(run_config(tmp_path, **{"dp.epsilon": 3.0}), node))
    assert ok.content[M.CLIENT][M.STATUS] == M.STATUS_OK and ok.content[M.METRICS][M.NUM_EXAMPLES] == 10


@pytest.mark.parametrize("handler", ["train", "evaluate"])
def test_a_failing_site_tells_the_server_only_a_category(tmp_path, handler, caplog):
    from client.client_app import evaluate, train

    # Prepare: a site folder with a row that does not match its schema (the details name the file and the row)
    site, node = deployed_site(tmp_path, "secret-ward-7", **{"max-epsilon": 8.0, "client-id": "hospital-a"})
    index = site / "index.csv"
    lines = index.read_text().splitlines()
    lines[3] = lines[3].replace(",train,", ",train,label-of-patient-1234,", 1)  # a row no schema allows
    index.write_text("\n".join(lines) + "\n")
    # Execute
    reply = (train if handler == "train" else evaluate)(train_message(global_head()), context(run_config(tmp_path), node))
    # Assert: the reply names the site and says it failed; the details are in the site's log only
    assert not reply.has_error()
    ident = dict(reply.content[M.CLIENT])
    assert ident == {M.CLIENT_ID: "hospital-a", M.MODALITIES: [], M.STATUS: M.STATUS_FAILED, M.REASON: M.FAILURE_SITE}
    assert dict(reply.content[M.METRICS]) == {M.NUM_EXAMPLES: 0} and not reply.content.array_records
    assert "secret-ward-7" not in repr(reply.content)
    assert "secret-ward-7" in caplog.text  # the site's own log has what went wrong


def test_an_exhausted_client_whose_privacy_record_is_deleted_stays_exhausted(tmp_path):
    # Prepare: a client spends its whole budget in run a; run b then starts from there (refused, or trained with
    # enough noise to fit what is left: either way from ε ≈ 1, never from 0)
    flat = run_config(tmp_path, **{"dp.epsilon": 1.0})
    folder = tmp_path / "clients" / "client-00"
    handle_train(train_message(global_head(), 1, planned=1, run_id="run-a"), context(flat))
    before = handle_train(train_message(global_head(), 1, planned=1, run_id="run-b"), context(flat))
    spent = before.content[M.METRICS][M.EPSILON]
    assert spent > 0.9
    history = json.loads((folder / "privacy.json").read_text())["privacy"]["history"]
    # Execute: the accountant history is deleted (the ledger and its key remain)
    (folder / "privacy.json").unlink()
    again = handle_train(train_message(global_head(), 1, planned=1, run_id="run-c"), context(flat))
    # Assert: rebuilt from the ledger, the same decision as before, epsilon where it was (not 0)
    assert again.content[M.CLIENT][M.STATUS] == before.content[M.CLIENT][M.STATUS]
    assert 1.0 >= again.content[M.METRICS][M.EPSILON] >= spent - 1e-9
    assert json.loads((folder / "privacy.json").read_text())["privacy"]["history"][: len(history)] == history
    assert audit_path(folder).clients["client-00"].verified  # one chain: the rebuilt state signs on with the same key


def test_a_deleted_privacy_record_continues_from_the_ledger(tmp_path):
    flat = run_config(tmp_path)
    folder = tmp_path / "clients" / "client-00"
    first = handle_train(train_message(global_head(), 1), context(flat))
    (folder / "privacy.json").unlink()
    second = handle_train(train_message(global_head(), 2), context(flat))
    assert second.content[M.CLIENT][M.STATUS] == M.STATUS_OK
    assert second.content[M.METRICS][M.EPSILON] > first.content[M.METRICS][M.EPSILON]  # continues, not from 0
    again = handle_train(train_message(global_head(), 2), context(flat))  # round 2 is known as trained: re-sent
    assert M.unpack_arrays(again.content).keys() == M.unpack_arrays(second.content).keys()
