"""``fedfuse site supernode`` before Flower starts: node config, data folder and state folder checked; connection hints."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest

from client.preflight import check_start, node_config_from_args
from client.site import resolve_site
from client.state import PRIVACY_FILE, ClientRecord, ClientState
from common.config import RunConfig
from common.data.synthetic_sites import write_synthetic_sites
from common.privacy.accounting import PrivacyHistory
from common.privacy.ledger import KEY_FILE, LEDGER_FILE, Ledger, LedgerKey, entry_fields
from fedfuse.cli import main
from fedfuse.commands.site import connection_hint


@pytest.fixture
def site(tmp_path: Path) -> dict:
    """A valid site folder 'berlin' (image + signal) and a node config naming it, with a fresh state folder."""
    data = write_synthetic_sites(tmp_path / "data", {"berlin": ("image", "signal")}, samples=20)["berlin"]
    return {"data-dir": str(data), "state-dir": str(tmp_path / "state"), "max-epsilon": 8.0, "num-train-examples": 16}


def _trained_state(folder: Path, client_id: str = "berlin", modalities=("image", "signal")) -> LedgerKey:
    """A state folder as a site leaves it after one round: privacy record, signed ledger entry, ledger key."""
    folder.mkdir(parents=True, exist_ok=True)
    ClientState(folder).save_record(
        ClientRecord(
            client_id,
            tuple(modalities),
            PrivacyHistory(accountant="prv", delta=1e-5, entries=[(1.0, 0.1, 10)], runs=["r"]),
            [["r", 1]],
        )
    )
    key = LedgerKey.load_or_create(folder / KEY_FILE)
    Ledger(folder / LEDGER_FILE).append(
        entry_fields(
            run_id="r",
            client_id=client_id,
            round=1,
            status="trained",
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=10,
            max_grad_norm=1.0,
            delta=1e-5,
            accountant="prv",
            epsilon=0.5,
            budget=8.0,
            update_hash="0" * 64,
            modalities=list(modalities),
        ),
        key,
    )
    return key


def test_a_valid_site_with_a_new_or_trained_state_folder_may_start(site):
    report = check_start(site)
    assert report.problems == []
    assert any("site 'berlin', 20 samples (test 4, train 16), modalities image, signal" in f for f in report.facts)
    assert any("new (created at the first task)" in f for f in report.facts)
    assert not Path(site["state-dir"]).exists()  # checking creates nothing
    assert check_start(site | {"state-dir": site["state-dir"] + "/a/b"}).problems == []  # created with its parents
    Path(site["state-dir"]).write_text("a file")
    assert any("cannot be created in" in p for p in check_start(site | {"state-dir": site["state-dir"] + "/a"}).problems)
    assert any(p.endswith(": not a folder") for p in check_start(site).problems)
    Path(site["state-dir"]).unlink()

    _trained_state(Path(site["state-dir"]))
    report = check_start(site)
    assert report.problems == [] and any("1 round(s) trained so far, 1 ledger entries, ε so far 0.5" in f for f in report.facts)


def test_a_site_without_a_plausible_declared_training_set_size_may_not_start(site):
    undeclared = {k: v for k, v in site.items() if k != "num-train-examples"}
    assert any("'num-train-examples' is required" in p for p in check_start(undeclared).problems)
    assert any("far from the site folder's training split" in p for p in check_start(site | {"num-train-examples": 100}).problems)
    # the refusal is the start check's alone (local); a message handler only warns at the site
    assert resolve_site(site | {"num-train-examples": 100}, RunConfig(), 1).declared_examples == 100


def test_a_broken_data_folder_is_reported_with_every_problem(site):
    index = Path(site["data-dir"]) / "index.csv"
    rows = [line.split(",") for line in index.read_text().splitlines()]
    rows[1][2], rows[2][2] = "9", "x"  # two bad labels
    index.write_text("\n".join(",".join(r) for r in rows) + "\n")
    (Path(site["data-dir"]) / "signal.npy").unlink()
    problems = check_start(site).problems
    data = f"data-dir {site['data-dir']}: "
    assert f"{data}index.csv, row 0, column 'label': label 9 is out of range [0, 6)" in problems
    assert any(p.startswith(f"{data}index.csv, row 1, column 'label'") for p in problems)
    assert any(p.startswith(f"{data}signal.npy") for p in problems)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("other-client", "belongs to client 'paris', not 'berlin'"),
        ("other-modalities", "holds encoders for ['image'], but the client now has ['image', 'signal']"),
        ("unreadable-record", f"{PRIVACY_FILE} is unreadable"),
        ("tampered-ledger", "content does not match its entry_hash"),
        ("other-key", f"{LEDGER_FILE} was signed with another key than {KEY_FILE}"),
        ("missing-key", f"{LEDGER_FILE} has 1 entries but {KEY_FILE} is missing"),
    ],
)
def test_a_state_folder_that_is_unreadable_or_not_this_sites_is_refused(site, damage, expected):
    state = Path(site["state-dir"])
    if damage == "other-client":
        _trained_state(state, client_id="paris")
    elif damage == "other-modalities":
        _trained_state(state, modalities=("image",))
    else:
        _trained_state(state)
    if damage == "unreadable-record":
        (state / PRIVACY_FILE).write_text("{not json")
    elif damage == "tampered-ledger":
        entry = json.loads((state / LEDGER_FILE).read_text())
        entry["epsilon"] = 0.1
        (state / LEDGER_FILE).write_text(json.dumps(entry) + "\n")
    elif damage == "other-key":
        (state / KEY_FILE).unlink()
        LedgerKey.load_or_create(state / KEY_FILE)
    elif damage == "missing-key":
        (state / KEY_FILE).unlink()
    problems = check_start(site).problems
    assert any(p.startswith(f"state-dir {state}: ") and expected in p for p in problems), problems


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"data-dir": None}, "the node config names no data"),
        ({"state-dir": None}, "node config key 'state-dir' is required"),
        ({"max-epsilon": -1.0}, "'max-epsilon' must be a number > 0"),
        ({"colour": "red"}, "unknown node config key(s) ['colour']"),
    ],
)
def test_a_bad_node_config_is_refused(site, change, expected):
    config = {k: v for k, v in (site | change).items() if v is not None}
    assert any(expected in p for p in check_start(config).problems)


def test_the_node_config_is_read_from_flower_supernodes_options(site):
    args = ["--insecure", "--node-config", f'data-dir="{site["data-dir"]}" max-epsilon=8.0 max-delta=1e-05', "--port", "1"]
    assert node_config_from_args(args) == {"data-dir": site["data-dir"], "max-epsilon": 8.0, "max-delta": 1e-05}
    assert node_config_from_args(["--insecure"]) == {}


def test_site_supernode_refuses_to_start_flower_and_prints_the_report(site, capsys, monkeypatch):
    (Path(site["data-dir"]) / "schema.json").write_text("{")

    def no_flower(*args, **kwargs):
        raise AssertionError("flower-supernode must not be started")

    monkeypatch.setattr(subprocess, "Popen", no_flower)
    node_config = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in site.items())
    status = main(["site", "supernode", "--", "--insecure", "--superlink", "127.0.0.1:1", "--node-config", node_config])
    err = capsys.readouterr().err
    assert status == 2
    assert "this site is not ready to start (1 problem(s)); flower-supernode was not started" in err
    assert f"data-dir {site['data-dir']}: schema.json" in err


def _facts(**kw):
    return argparse.Namespace(
        **(
            {
                "superlink": "link.example.org:9093",
                "root_certificates": "ca.crt",
                "auth_supernode_private_key": "auth.key",
                "insecure": False,
            }
            | kw
        )
    )


@pytest.mark.parametrize(
    "detail, first",
    [
        (["[code: 2004] Failed to activate SuperNode."], "key is not registered"),  # what Flower 1.42 prints for it
        (["[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate"], "wrong CA"),
        (["[Errno 111] Connection refused"], "SuperLink is down or the address is wrong"),
        (["All connection attempts failed"], "key is not registered"),  # nothing to go by: every cause, the usual order
    ],
)
def test_a_connection_failure_names_every_likely_cause_the_indicated_one_first(detail, first):
    hint = connection_hint(_facts(), detail).splitlines()
    assert hint[0] == "flower-supernode could not connect to the SuperLink at link.example.org:9093. Likely causes:"
    assert first in hint[1] and len(hint) == 4
    text = "\n".join(hint)
    assert "flwr supernode register" in text and "--root-certificates (ca.crt)" in text and "link.example.org:9093" in text


def test_without_tls_or_a_node_key_only_the_possible_causes_are_named():
    insecure = connection_hint(_facts(insecure=True, root_certificates=None, auth_supernode_private_key=None), [])
    assert insecure.splitlines()[0].endswith("Likely cause:") and "SuperLink is down" in insecure
    assert "registered" not in insecure and "CA" not in insecure
    no_key = connection_hint(_facts(auth_supernode_private_key=None), ["[Errno 111] Connection refused"]).splitlines()
    assert len(no_key) == 3 and "SuperLink is down" in no_key[1] and "wrong CA" in no_key[2]


def test_fedfuse_sites_shows_each_registered_site_by_name_and_how_many_are_online():
    from fedfuse.commands.sites import format_sites

    table = format_sites(
        [
            {"name": "berlin", "node_id": 11, "status": "online", "since": "2026-11-30T13:40:02.123+00:00"},
            {"name": "paris", "node_id": 12, "status": "registered", "since": "2026-11-30T13:30:00+00:00"},
            {"name": None, "node_id": 13, "status": "offline", "since": None},
        ]
    ).splitlines()
    assert table[0].split() == ["site", "node", "id", "status", "since"]
    assert table[1].split() == ["berlin", "11", "online", "2026-11-30", "13:40:02"]
    assert table[2].split()[:3] == ["paris", "12", "registered"] and "(never connected)" in table[2]
    assert table[3].split() == ["(no", "name)", "13", "offline"]
    assert table[4] == "1 of 3 site(s) online" and "register" in table[5]


def test_the_warm_executor_stops_on_sigterm_even_while_it_asks_the_supernode_for_a_task(caplog):
    # The SuperNode is an edge here: a Runtime API whose AcquireTask is slow (a SuperNode that is busy or gone)
    import os
    import signal
    import threading
    import time

    from client.executor import WarmExecutor

    class SlowRuntimeApi:
        def AcquireTask(self, request):  # noqa: N802 (Flower's method name)
            time.sleep(5)
            raise ConnectionError("no SuperNode")

        def close(self):
            pass

    executor = WarmExecutor("127.0.0.1:9", poll=0.05)
    executor._client = SlowRuntimeApi()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))  # lands inside AcquireTask
    started = time.monotonic()
    timer.start()
    with caplog.at_level("INFO", logger="fedfuse.executor"):
        executor.serve(keep_going=lambda: time.monotonic() - started < 8)  # else until SIGTERM
    timer.join()
    assert time.monotonic() - started < 3.0 and "SIGTERM received, stopping" in caplog.text
