"""`fedfuse audit` on the ledgers of real simulations: verify, re-account, tampering, over budget, resume. Slow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from simulate_helpers import leftovers, simulate

from common.privacy.audit import DEFAULT_TOLERANCE, EXIT_CODES, allowance
from common.privacy.ledger import CHAIN_FIELDS, KEY_FILE, LEDGER_FILE, OVER_BUDGET, TAMPERING, Ledger, LedgerKey, encode_entry
from fedfuse.cli import main
from simulations import runner
from simulations.scenario import build_config

pytestmark = pytest.mark.slow

CLIENTS = 3
OVERRIDES = [f"data.num-clients={CLIENTS}", "data.samples-per-client=300", "dp.epsilon=6"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 2-round simulation of 3 clients, run in this process."""
    out = tmp_path_factory.mktemp("audit-e2e") / "run"
    flat = build_config(None, [*OVERRIDES, "num-server-rounds=2"]) | {"out-dir": str(out)}
    pythonpath = os.environ.get("PYTHONPATH")
    runner.run(flat, num_clients=CLIENTS, out_dir=out)
    assert json.loads((out / "results.json").read_text())["status"] == "completed"
    # Flower's Ray backend sets PYTHONPATH in this process: the run restores it (a later pip or subprocess sees the
    # checkout otherwise); Ray's own driver settings (RAY_CLIENT_MODE, PYTHONBREAKPOINT, ...) stay as Ray wants them
    assert os.environ.get("PYTHONPATH") == pythonpath
    return out


def ledger_copy(run: Path, dest: Path) -> Path:
    """Only the ledgers (and keys) of a run folder, in the same layout, to edit without touching the run."""
    for path in [*run.glob("ledgers/*.jsonl"), *run.glob(f"clients/*/{LEDGER_FILE}"), *run.glob(f"clients/*/{KEY_FILE}")]:
        target = dest / path.relative_to(run)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def audit_json(path: Path, capsys) -> tuple[int, dict]:
    status = main(["audit", str(path), "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_audit_of_a_real_run_verifies_and_recomputes_every_clients_epsilon(run_dir, capsys):
    # Execute
    status, report = audit_json(run_dir, capsys)
    # Assert: every client, both copies, both rounds; recorded and recomputed epsilon agree
    results = json.loads((run_dir / "results.json").read_text())
    assert status == 0 and report["ok"] and report["exit_status"] == 0
    assert set(report["clients"]) == set(results["privacy"]["clients"]) and len(report["clients"]) == CLIENTS
    for cid, c in report["clients"].items():
        assert set(c["sources"]) == {"client", "federation"}, cid
        assert (c["verified"], c["problems"], c["rounds"], c["budget"]) == (True, [], 2, 6.0), cid
        assert len(c["per_entry"]) == 2
        for e in c["per_entry"]:
            assert abs(e["epsilon"] - e["recomputed_epsilon"]) <= allowance(e["recomputed_epsilon"], DEFAULT_TOLERANCE)
            assert 0 < e["recomputed_epsilon"] <= e["epsilon"]  # Opacus PRV lies above dp-accounting PLD
        assert c["epsilon"] == pytest.approx(results["privacy"]["clients"][cid]["epsilon"])
        # the client's copy and the federation's copy are the same bytes
        assert (run_dir / "clients" / cid / LEDGER_FILE).read_bytes() == (run_dir / "ledgers" / f"{cid}.jsonl").read_bytes()


@pytest.mark.parametrize("copy", ["federation", "client"])
def test_one_edited_ledger_line_is_tampering(run_dir, tmp_path, capsys, copy):
    # Prepare: claim twice the noise in round 1 of one client's copy, on disk
    folder = ledger_copy(run_dir, tmp_path / "run")
    cid = sorted(p.stem for p in (folder / "ledgers").glob("*.jsonl"))[0]
    path = folder / "ledgers" / f"{cid}.jsonl" if copy == "federation" else folder / "clients" / cid / LEDGER_FILE
    lines = path.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["mechanism"]["noise_multiplier"] *= 2
    path.write_text("\n".join([encode_entry(entry), *lines[1:]]) + "\n")
    # Execute
    status, report = audit_json(folder, capsys)
    # Assert: tampering for that client only
    assert status == EXIT_CODES[TAMPERING] == 3
    bad = report["clients"][cid]
    assert not bad["verified"] and any("edited after signing" in p for p in bad["problems"])
    assert any("differ" in p for p in bad["problems"])  # the two copies no longer agree
    assert all(c["ok"] for other, c in report["clients"].items() if other != cid)


def test_an_over_budget_ledger_is_flagged(run_dir, tmp_path, capsys):
    # Prepare: a client that signed a last round over its budget (both copies, validly signed with its key)
    folder = ledger_copy(run_dir, tmp_path / "run")
    cid = sorted(p.stem for p in (folder / "ledgers").glob("*.jsonl"))[-1]
    key = LedgerKey.load_or_create(folder / "clients" / cid / KEY_FILE)
    entries = Ledger(folder / "ledgers" / f"{cid}.jsonl").entries()
    entries[-1]["budget"] = round(entries[-1]["epsilon"] / 2, 6)
    resigned = Ledger(tmp_path / "resigned.jsonl")
    for e in entries:
        resigned.append({k: v for k, v in e.items() if k not in CHAIN_FIELDS}, key)
    for target in (folder / "ledgers" / f"{cid}.jsonl", folder / "clients" / cid / LEDGER_FILE):
        shutil.copy2(resigned.path, target)
    # Execute
    status, report = audit_json(folder, capsys)
    # Assert: the chain verifies, the budget is exceeded
    assert status == EXIT_CODES[OVER_BUDGET] == 5
    bad = report["clients"][cid]
    assert bad["verified"] and bad["status"] == OVER_BUDGET
    assert any("over its budget" in p for p in bad["problems"])


def test_a_killed_and_resumed_run_audits_as_one_chain_per_client(tmp_path, capsys):
    # Prepare: a 3-round run killed (SIGKILL to its process group) once round 1's checkpoint exists
    out = tmp_path / "run"
    latest = out / "checkpoints" / "latest.json"
    overrides = [a for o in [*OVERRIDES, "num-server-rounds=3"] for a in ("--set", o)]
    simulate(["--out", str(out), *overrides], out, until=latest.exists)
    assert leftovers(out, wait=0) == []
    killed_at = json.loads(latest.read_text())["round"]
    assert killed_at < 3  # (often killed between the checkpoint and results.json: a crash like any other)
    # Execute: resume, then audit
    simulate(["--resume", str(out)], out)
    status, report = audit_json(out, capsys)
    # Assert: every ledger verifies as one chain (one key, one run) with rounds 1, 2, 3 trained once each
    assert status == 0 and report["ok"]
    assert len(report["clients"]) == CLIENTS
    assert leftovers(out, wait=30) == []  # a finished run leaves no process behind
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2, 3]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    for cid, c in report["clients"].items():
        entries = Ledger(out / "ledgers" / f"{cid}.jsonl").entries()
        assert [(e["run_id"], e["round"], e["status"]) for e in entries] == [(run_id, r, "trained") for r in (1, 2, 3)]
        assert [e["index"] for e in entries] == [0, 1, 2] and len({e["public_key"] for e in entries}) == 1
        assert set(c["sources"]) == {"client", "federation"} and c["rounds"] == 3
