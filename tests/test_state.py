"""Client state folder: restored each round, written atomically, never silently reset or shared."""

import pytest
import torch

from common.accounting import PrivacyHistory
from common.state import ClientRecord, ClientState, StateError


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
