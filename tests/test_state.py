"""Client state folder: restored each round, written atomically, never silently reset or shared."""

import pytest
import torch

from client.state import ClientRecord, ClientState, StateError
from common.privacy.accounting import PrivacyHistory


def test_record_round_trip(tmp_path):
    state = ClientState(tmp_path)
    record = ClientRecord("client-00", ("image",), PrivacyHistory(delta=1e-5, entries=[(1.0, 0.1, 10)]), [["run", 1]])
    state.save_record(record)
    again = state.load_record(client_id="client-00", modalities=("image",), accountant="prv")
    assert again.history.entries == [(1.0, 0.1, 10)] and again.trained("run", 1) and not again.trained("run", 2)


def test_a_new_client_starts_with_an_empty_history(tmp_path):
    record = ClientState(tmp_path / "new").load_record(client_id="c", modalities=("image",), accountant="rdp")
    assert record.history.entries == [] and record.history.accountant == "rdp"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(client_id="other", modalities=("image",), accountant="prv"), "belongs to client 'client-00'"),
        (dict(client_id="client-00", modalities=("image", "signal"), accountant="prv"), "holds encoders for"),
        (dict(client_id="client-00", modalities=("image",), accountant="rdp"), "cannot switch"),
    ],
)
def test_a_state_folder_is_never_reused_for_something_else(tmp_path, kwargs, fragment):
    state = ClientState(tmp_path)
    state.save_record(ClientRecord("client-00", ("image",), PrivacyHistory()))
    with pytest.raises(StateError, match=fragment):
        state.load_record(**kwargs)


def test_a_corrupt_privacy_record_stops_training_instead_of_resetting_the_budget(tmp_path):
    (tmp_path / "privacy.json").write_text('{"format": 1, "client_id": "c", "modal')
    with pytest.raises(StateError, match="unreadable.*Restore it from a backup"):
        ClientState(tmp_path).load_record(client_id="c", modalities=("image",), accountant="prv")


def test_the_folder_lock_refuses_a_second_user(tmp_path):
    state = ClientState(tmp_path)
    with state.locked():
        with pytest.raises(StateError, match="in use by another process"):
            with ClientState(tmp_path).locked():
                pass
    with state.locked():  # released afterwards
        pass


def test_a_reply_is_only_returned_for_its_own_run_and_round(tmp_path):
    state = ClientState(tmp_path)
    state.save_reply({"head.x": torch.ones(2)}, run_id="r1", server_round=3, metrics={"num-examples": 5})
    arrays, metrics = state.load_reply(run_id="r1", server_round=3)
    assert torch.equal(arrays["head.x"], torch.ones(2)) and metrics == {"num-examples": 5}
    assert state.load_reply(run_id="r1", server_round=4) is None
    assert state.load_reply(run_id="r2", server_round=3) is None


def test_a_trained_model_is_tagged_as_its_rounds_update_and_replaces_an_older_reply_file(tmp_path):
    state = ClientState(tmp_path)
    state.save_reply({"head.x": torch.zeros(2)}, run_id="r1", server_round=2, metrics={"num-examples": 4})  # older version
    model = {"head.x": torch.ones(2), "encoders.image.w": torch.full((3,), 2.0)}
    # the older version's file is still read for its own round
    assert torch.equal(state.load_reply(run_id="r1", server_round=2)[0]["head.x"], torch.zeros(2))
    state.stage_trained(model, shared=["head.x"], run_id="r1", server_round=3, metrics={"num-examples": 5})
    state.commit_trained()
    arrays, metrics = state.load_reply(run_id="r1", server_round=3)
    assert list(arrays) == ["head.x"] and torch.equal(arrays["head.x"], torch.ones(2)) and metrics == {"num-examples": 5}
    assert set(state.load_model()) == set(model)  # the encoders stay on the site, in the same file
    assert not (tmp_path / "reply.safetensors").exists()
    assert state.load_reply(run_id="r1", server_round=2) is None and state.load_reply(run_id="r2", server_round=3) is None
    with pytest.raises(ValueError, match="not in the model"):
        state.stage_trained(model, shared=["head.y"], run_id="r1", server_round=4, metrics={})


def _ledger_of_one_round(folder, *, client_id="client-00", key=None):
    from common.privacy.ledger import KEY_FILE, LEDGER_FILE, Ledger, LedgerKey, entry_fields

    key = key or LedgerKey.load_or_create(folder / KEY_FILE)
    fields = entry_fields(
        run_id="run",
        client_id=client_id,
        round=1,
        status="trained",
        noise_multiplier=1.1,
        sample_rate=0.1,
        steps=10,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant="prv",
        epsilon=0.5,
        budget=8.0,
        update_hash=None,
        modalities=["image"],
    )
    Ledger(folder / LEDGER_FILE).append(fields, key)
    return folder / LEDGER_FILE


def test_a_missing_privacy_record_is_rebuilt_from_the_ledger(tmp_path):
    _ledger_of_one_round(tmp_path)
    record = ClientState(tmp_path).load_record(client_id="client-00", modalities=("image",), accountant="prv")
    assert record.history.entries == [(1.1, 0.1, 10)] and record.history.delta == 1e-5 and record.trained("run", 1)
    assert record.history.runs == ["run"]  # a format-2 entry names its run (format 1: "", lifetime cap only)
    assert (tmp_path / "privacy.json").exists()
    with pytest.raises(StateError, match="belongs to client 'client-00'"):  # the ledger's client, not the caller's
        (tmp_path / "privacy.json").unlink()
        ClientState(tmp_path).load_record(client_id="someone-else", modalities=("image",), accountant="prv")


def test_a_missing_privacy_record_with_an_untrustworthy_ledger_stops_training(tmp_path):
    from common.privacy.ledger import KEY_FILE, LedgerKey

    path = _ledger_of_one_round(tmp_path)
    path.write_text(path.read_text().replace('"steps":10', '"steps":1'))  # spend edited down
    with pytest.raises(StateError, match="does not verify"):
        ClientState(tmp_path).load_record(client_id="client-00", modalities=("image",), accountant="prv")
    other = tmp_path / "other"
    _ledger_of_one_round(other, key=LedgerKey.generate())  # signed by a key that is not the folder's
    LedgerKey.load_or_create(other / KEY_FILE)
    with pytest.raises(StateError, match="does not verify"):
        ClientState(other).load_record(client_id="client-00", modalities=("image",), accountant="prv")
    (other / KEY_FILE).unlink()
    with pytest.raises(StateError, match="ledger key ledger_key.pem are missing"):
        ClientState(other).load_record(client_id="client-00", modalities=("image",), accountant="prv")


def test_a_trained_model_without_any_privacy_record_stops_training(tmp_path):
    ClientState(tmp_path).save_model({"x": torch.ones(1)})
    with pytest.raises(StateError, match="privacy spend is unknown"):
        ClientState(tmp_path).load_record(client_id="c", modalities=("image",), accountant="prv")


def test_a_privacy_record_older_than_the_ledger_stops_training(tmp_path):
    # Prepare: the ledger charges one round; privacy.json, restored from a backup taken before it, none
    _ledger_of_one_round(tmp_path)
    ClientState(tmp_path).save_record(ClientRecord("client-00", ("image",), PrivacyHistory()))
    # Execute / Assert
    with pytest.raises(StateError, match="records 0 rounds that used the data, but the ledger .* records 1"):
        ClientState(tmp_path).load_record(client_id="client-00", modalities=("image",), accountant="prv")
    (tmp_path / "privacy.json").unlink()  # as the error says: the next load rebuilds it from the ledger
    record = ClientState(tmp_path).load_record(client_id="client-00", modalities=("image",), accountant="prv")
    assert record.history.entries == [(1.1, 0.1, 10)]
