"""`fedfuse audit`: re-accounting against Opacus, budgets, tampering, corrupt files, exit statuses."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy.audit import (
    DEFAULT_TOLERANCE,
    EXIT_CODES,
    RDP_ORDERS,
    allowance,
    audit_path,
    epsilon_from_history,
    format_report,
)
from common.privacy.ledger import (
    ACCOUNTING,
    CORRUPT,
    OVER_BUDGET,
    TAMPERING,
    Ledger,
    LedgerKey,
    decode_entry,
    encode_entry,
    entry_fields,
    entry_hash,
)
from fedfuse.cli import build_parser, main

DELTA = 1e-5
# (noise_multiplier, sample_rate, steps) per round; round 3 changes the mechanism.
ROUNDS = [(1.1, 0.01, 250), (1.1, 0.01, 250), (1.3, 0.02, 200), (1.1, 0.01, 250)]


def opacus_epsilons(accountant: str, rounds=ROUNDS) -> list[float]:
    """Cumulative epsilon after each round, as a client computes it with Opacus (one history for all rounds)."""
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    out = []
    for r in range(len(rounds)):
        acc.history = list(rounds[: r + 1])
        out.append(
            float(acc.get_epsilon(delta=DELTA) if accountant == "prv" else acc.get_epsilon(delta=DELTA, alphas=list(RDP_ORDERS)))
        )
    return out


def round_fields(r: int, mech, epsilon, *, accountant="prv", budget=8.0, client="site-a", status="trained", **over):
    sigma, q, steps = mech
    kw = dict(
        run_id="run-1",
        client_id=client,
        round=r,
        status=status,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        max_grad_norm=1.0,
        delta=DELTA,
        accountant=accountant,
        epsilon=epsilon,
        budget=budget,
        update_hash=f"{r:064x}",
        modalities=["acc", "gyro"],
        run_epsilon=epsilon,
        run_budget=budget,
    )
    kw.update(over)
    return entry_fields(**kw)


def build_run(root, clients: dict[str, list[dict]]) -> None:
    """A run folder: each client's own copy in clients/<id>/ and the server's copy in ledgers/<id>.jsonl."""
    for cid, rows in clients.items():
        key = LedgerKey.load_or_create(root / "clients" / cid / "ledger_key.pem")
        own = Ledger(root / "clients" / cid / "ledger.jsonl")
        federation = Ledger(root / "ledgers" / f"{cid}.jsonl")
        for f in rows:
            entry = own.append(f, key)
            federation.append_signed(decode_entry(encode_entry(entry)), expected_public_key=key.public_hex)


def honest(accountant="prv", budget=8.0, client="site-a") -> list[dict]:
    eps = opacus_epsilons(accountant)
    return [
        round_fields(r + 1, m, e, accountant=accountant, budget=budget, client=client)
        for r, (m, e) in enumerate(zip(ROUNDS, eps))
    ]


@pytest.fixture(scope="module")
def prv_rows():
    return honest("prv")


def kinds(report) -> set[str]:
    return set().union(*(c.kinds for c in report.clients.values()))


# --- re-accounting ------------------------------------------------------------------------------


def test_epsilon_from_history_reference_values():
    # Reference (../shared/notes/privacy.md): sigma 1.1, q 0.01, 1000 steps, delta 1e-5: PLD(1e-4) 1.5154,
    # RDP 1.7118. PLD here uses interval 1e-3, which adds 0.0008.
    assert epsilon_from_history([(1.1, 0.01, 1000)], delta=DELTA, accountant="prv") == pytest.approx(1.5162, abs=2e-4)
    # RDP over integer orders 2-256 (format 2, as Opacus computes it in training): 1.7253; over dp-accounting's
    # default orders (format-1 ledgers): 1.7118.
    assert epsilon_from_history([(1.1, 0.01, 1000)], delta=DELTA, accountant="rdp") == pytest.approx(1.7253, abs=1e-4)
    assert epsilon_from_history([(1.1, 0.01, 1000)], delta=DELTA, accountant="rdp", legacy=True) == pytest.approx(
        1.7118, abs=1e-4
    )
    # Identical mechanisms merge; order does not matter; no steps = no spend; no noise = no guarantee.
    split = [(1.1, 0.01, 400), (2.0, 0.05, 0), (1.1, 0.01, 600)]
    assert epsilon_from_history(split, delta=DELTA, accountant="prv") == epsilon_from_history(
        [(1.1, 0.01, 1000)], delta=DELTA, accountant="prv"
    )
    assert epsilon_from_history([], delta=DELTA, accountant="prv") == 0.0
    assert epsilon_from_history([(0.0, 0.01, 10)], delta=DELTA, accountant="rdp") == math.inf


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_histories_from_opacus_agree_within_tolerance(tmp_path, accountant, prv_rows):
    # Prepare
    rows = prv_rows if accountant == "prv" else honest("rdp")
    build_run(tmp_path, {"site-a": rows})
    # Execute
    report = audit_path(tmp_path)
    # Assert
    client = report.clients["site-a"]
    assert report.exit_status == 0 and client.findings == []
    for entry, recomputed in zip(client.entries, client.recomputed):
        diff = entry["epsilon"] - recomputed
        assert abs(diff) <= allowance(recomputed, DEFAULT_TOLERANCE)
        if accountant == "prv":
            assert 0.005 < diff < 0.015  # Opacus PRV is an upper estimate with eps_error 0.01 above PLD
        else:
            assert abs(diff) < 1e-3
    assert client.history == [
        {"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 500},
        {"noise_multiplier": 1.3, "sample_rate": 0.02, "steps": 200},
        {"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 250},
    ]


def test_accountant_reset_every_round_is_an_accounting_disagreement(tmp_path):
    # Prepare: a client that builds a new accountant each round records one round's epsilon
    per_round = [opacus_epsilons("prv", [m])[0] for m in ROUNDS]
    rows = [round_fields(r + 1, m, e) for r, (m, e) in enumerate(zip(ROUNDS, per_round))]
    build_run(tmp_path, {"site-a": rows})
    # Execute
    report = audit_path(tmp_path)
    # Assert
    assert report.exit_status == EXIT_CODES[ACCOUNTING] == 6
    problems = [f.message for f in report.clients["site-a"].findings]
    assert any("entry 1 (run 'run-1', round 2)" in p and "under-reported" in p for p in problems)
    assert any("epsilon fell" in p for p in problems)  # round 3's single-round epsilon is below round 2's


def test_over_budget_is_flagged(tmp_path, prv_rows):
    # Prepare: the same honest history, against a budget of 1.0 that rounds 2-4 exceed
    # (Opacus PRV after each round: 0.802, 1.093, 1.532, 1.711)
    rows = [dict(r, budget=1.0) for r in prv_rows]
    build_run(tmp_path, {"site-a": rows})
    # Execute
    report = audit_path(tmp_path)
    # Assert
    assert report.exit_status == EXIT_CODES[OVER_BUDGET] == 5
    assert kinds(report) == {OVER_BUDGET}
    problems = [f.message for f in report.clients["site-a"].findings]
    assert len(problems) == 3 and all("over its budget ε = 1" in p for p in problems)
    assert problems[0].startswith("entry 1 (run 'run-1', round 2): records ε = 1.0927")


def _sign_chain(rows: list[dict], key: LedgerKey) -> list[dict]:
    """Sign entries without Ledger.append's checks (a client with a bug)."""
    out, prev = [], "0" * 64
    for i, r in enumerate(rows):
        e = dict(r, time="2026-01-01T00:00:00Z", index=i, prev_hash=prev, public_key=key.public_hex)
        e["entry_hash"] = entry_hash(e)
        e["signature"] = key.sign(bytes.fromhex(e["entry_hash"])).hex()
        out.append(e)
        prev = e["entry_hash"]
    return out


def test_refused_round_that_trained_is_over_budget(tmp_path, prv_rows):
    # Prepare: round 2 says "refused" but records steps and an update
    rows = [dict(r) for r in prv_rows[:2]]
    rows[1]["status"] = "refused-budget"
    entries = _sign_chain(rows, LedgerKey.generate())
    (tmp_path / "site-a.jsonl").write_text("".join(encode_entry(e) + "\n" for e in entries))
    # Execute
    report = audit_path(tmp_path)
    # Assert
    assert report.exit_status == 5
    assert any("refused for budget but records 250 steps and an update" in f.message for f in report.clients["site-a"].findings)


def test_non_private_client_is_reported_not_failed(tmp_path):
    # Prepare
    rows = [round_fields(r, (0.0, 0.01, 100), math.inf, budget=math.inf, max_grad_norm=None, client="site-n") for r in (1, 2)]
    build_run(tmp_path, {"site-n": rows})
    # Execute
    report = audit_path(tmp_path)
    data = report.to_json()["clients"]["site-n"]
    # Assert
    assert report.exit_status == 0
    assert (data["private"], data["epsilon"], data["recomputed_epsilon"], data["status"]) == (
        False,
        None,
        None,
        "ok (non-private)",
    )
    assert "(ε = ∞, non-private)" in format_report(report)


# --- tampering and corrupt files ----------------------------------------------------------------


def test_edited_federation_copy_is_tampering_and_wins_over_budget(tmp_path, prv_rows):
    # Prepare: over budget AND the server's copy edited to hide it
    build_run(tmp_path, {"site-a": [dict(r, budget=1.0) for r in prv_rows]})
    path = tmp_path / "ledgers" / "site-a.jsonl"
    lines = path.read_text().splitlines()
    edited = json.loads(lines[3])
    edited["epsilon"] = 0.9
    lines[3] = encode_entry(edited)
    path.write_text("\n".join(lines) + "\n")
    # Execute
    report = audit_path(tmp_path)
    # Assert
    assert kinds(report) == {TAMPERING, OVER_BUDGET}
    assert report.exit_status == EXIT_CODES[TAMPERING] == 3
    problems = [f.message for f in report.clients["site-a"].findings]
    assert "federation copy: entry 3: content does not match its entry_hash (edited after signing)" in problems
    assert "copies differ: entry 3 differs between the client's copy and the federation's copy" in problems
    assert report.clients["site-a"].accounted_copy == "client"


def test_federation_copy_shorter_than_client_copy_is_tampering(tmp_path, prv_rows):
    build_run(tmp_path, {"site-a": prv_rows})
    path = tmp_path / "ledgers" / "site-a.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:3]))
    report = audit_path(tmp_path)
    assert report.exit_status == 3
    assert any("the federation's copy has 3 entries, the client's copy 4" in f.message for f in report.clients["site-a"].findings)


def test_ledger_filed_under_another_client_is_tampering(tmp_path, prv_rows):
    build_run(tmp_path, {"site-a": prv_rows})
    (tmp_path / "ledgers" / "site-a.jsonl").rename(tmp_path / "ledgers" / "site-b.jsonl")
    report = audit_path(tmp_path)
    assert report.exit_status == 3
    assert any(
        "entry 0 is for client 'site-a', but the ledger is filed as 'site-b'" in f.message
        for f in report.clients["site-b"].findings
    )


def test_torn_line_is_corrupt(tmp_path, prv_rows):
    # Prepare: a loose ledger file whose last write was cut short
    build_run(tmp_path / "run", {"site-a": prv_rows})
    data = (tmp_path / "run" / "ledgers" / "site-a.jsonl").read_bytes()
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "site-a.jsonl").write_bytes(data[:-25])
    # Execute
    report = audit_path(tmp_path / "loose")
    # Assert
    assert report.exit_status == EXIT_CODES[CORRUPT] == 4
    assert kinds(report) == {CORRUPT}
    assert report.clients["site-a"].rounds == 3  # the complete entries are still audited


@pytest.mark.parametrize("content", [b"\x00\xff garbage", b"", b"{}\n", b'{"version": 1, "mechanism": "x"}\n'])
def test_corrupt_files_give_a_clean_report(tmp_path, capsys, content):
    # Prepare
    (tmp_path / "site-x.jsonl").write_bytes(content)
    # Execute
    status = main(["audit", str(tmp_path)])
    out = capsys.readouterr().out
    # Assert
    if content == b"":
        assert status == 0  # an empty ledger: the client never trained
    else:
        assert status == 4
        assert "[corrupt]" in out and "Traceback" not in out


# --- command line -------------------------------------------------------------------------------


def test_cli_table_json_and_plot(tmp_path, capsys, prv_rows):
    # Prepare
    build_run(tmp_path, {"site-a": prv_rows, "site-b": honest("rdp", client="site-b")})
    plot = tmp_path / "epsilon.png"
    # Execute
    table_status = main(["audit", str(tmp_path), "--plot", str(plot)])
    table = capsys.readouterr().out
    json_status = main(["audit", str(tmp_path), "--json", "--tolerance", "0.05"])
    data = json.loads(capsys.readouterr().out)
    # Assert
    assert table_status == json_status == 0
    eps_a = prv_rows[-1]["epsilon"]
    assert f"(ε = {eps_a:.2f}, δ = 1e-05)" in table
    assert "tolerance: one-sided: an under-report" in table and "over-report fails beyond 0.02 × max(1" in table
    assert "site-a  acc,gyro    4" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["ok"] is True and data["tolerance"] == 0.05
    a = data["clients"]["site-a"]
    assert set(a) >= {
        "epsilon",
        "recomputed_epsilon",
        "delta",
        "budget",
        "history",
        "verified",
        "problems",
        "modalities",
        "rounds",
    }
    assert (a["epsilon"], a["delta"], a["budget"], a["verified"], a["problems"], a["modalities"], a["rounds"]) == (
        eps_a,
        DELTA,
        8.0,
        True,
        [],
        ["acc", "gyro"],
        4,
    )
    assert a["history"][0] == {"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 500}


def test_cli_exit_statuses_for_usage_errors(tmp_path, capsys, prv_rows):
    build_run(tmp_path, {"site-a": prv_rows})
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert main(["audit", str(tmp_path), "--plot", str(tmp_path / "ledgers" / "site-a.jsonl")]) == 2
    assert "give a file name ending in .png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["audit", str(tmp_path), "--tolerance", "-1"])
    assert exc.value.code == 2


def test_cli_returns_tampering_status(tmp_path, prv_rows):
    build_run(tmp_path, {"site-a": prv_rows})
    path = tmp_path / "clients" / "site-a" / "ledger.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[2], lines[3]]) + "\n")  # entry 1 dropped
    assert main(["audit", str(tmp_path)]) == 3


def test_pinned_keys_catch_a_re_signed_ledger(tmp_path, prv_rows):
    # Prepare: the sites' keys as `fedfuse certs` publishes them (PEM SubjectPublicKeyInfo)
    from cryptography.hazmat.primitives import serialization

    build_run(tmp_path / "run", {"site-a": prv_rows[:2]})
    keys = tmp_path / "ledger-keys"
    keys.mkdir()

    def publish(name: str, key: LedgerKey) -> None:
        pub = serialization.load_pem_private_key(key.pem(), None).public_key()
        (keys / f"{name}.pem").write_bytes(
            pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    real = LedgerKey.load_or_create(tmp_path / "run" / "clients" / "site-a" / "ledger_key.pem")
    # Execute / Assert: the real key verifies, another key is tampering, a client without a key too
    publish("site-a", real)
    assert main(["audit", str(tmp_path / "run"), "--keys", str(keys)]) == 0
    publish("site-a", LedgerKey.generate())
    assert main(["audit", str(tmp_path / "run"), "--keys", str(keys)]) == 3
    (keys / "site-a.pem").unlink()
    report = audit_path(tmp_path / "run", keys=keys)
    assert report.exit_status == 3
    assert "unknown client" in report.clients["site-a"].findings[0].message


def test_help_documents_exit_statuses():
    parser, _ = build_parser(["audit"])
    sub = parser._subparsers._group_actions[0].choices["audit"]
    text = sub.format_help()
    for line in ["3  tampering", "4  corrupt", "5  over budget", "6  accounting disagreement", "2  usage error"]:
        assert line in text


def test_an_unexpected_error_is_reported_not_raised(tmp_path, monkeypatch, prv_rows):
    # Prepare: the accountant fails on this ledger
    build_run(tmp_path, {"site-a": prv_rows[:1]})

    def boom(*args, **kwargs):
        raise ValueError("accountant failed")

    monkeypatch.setattr("common.privacy.audit.epsilon_from_history", boom)
    # Execute
    report = audit_path(tmp_path)
    # Assert
    assert report.exit_status == 4
    assert report.clients["site-a"].findings[-1].message == (
        "the audit could not process this ledger (ValueError: accountant failed)"
    )


# --- who must have a ledger, and auditing at a site ---------------------------------------------


def publish_key(keys, name: str, key: LedgerKey) -> None:
    """A site's ledger public key as `fedfuse certs` publishes it (PEM SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    keys.mkdir(exist_ok=True)
    pub = serialization.load_pem_private_key(key.pem(), None).public_key()
    (keys / f"{name}.pem").write_bytes(
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_a_client_whose_ledgers_were_both_deleted_fails_the_audit(tmp_path, prv_rows):
    # Prepare: a run of two clients; results.json lists both; both copies of site-b's ledger are deleted
    build_run(tmp_path / "run", {"site-a": prv_rows, "site-b": honest(client="site-b")})
    keys = tmp_path / "keys"
    for cid in ("site-a", "site-b"):
        publish_key(keys, cid, LedgerKey.load_or_create(tmp_path / "run" / "clients" / cid / "ledger_key.pem"))
    results = {
        "privacy": {
            "clients": {
                "site-a": {"rounds_trained": 4, "epsilon": 1.0},
                "site-b": {"rounds_trained": 4, "epsilon": 1.0},
                "site-c": {"rounds_trained": 0, "status": "excluded: policy-refused"},
            }
        }
    }
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    assert audit_path(tmp_path / "run", keys=keys).exit_status == 0  # site-c refused the run: it needs no ledger
    (tmp_path / "run" / "ledgers" / "site-b.jsonl").unlink()
    (tmp_path / "run" / "clients" / "site-b" / "ledger.jsonl").unlink()
    # Execute / Assert: the roster in results.json catches it
    report = audit_path(tmp_path / "run")
    assert report.exit_status == EXIT_CODES[TAMPERING]
    assert "no ledger at all, though results.json records its privacy spend" in report.clients["site-b"].findings[0].message
    # and the pinned keys catch it when results.json was edited too
    results["privacy"]["clients"].pop("site-b")
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    assert audit_path(tmp_path / "run").exit_status == 0  # the server's word alone hides the dropped client
    report = audit_path(tmp_path / "run", keys=keys)
    assert report.exit_status == EXIT_CODES[TAMPERING]
    assert "its ledger key is pinned" in report.clients["site-b"].findings[0].message


def test_a_site_audits_its_own_state_folder_and_ledger(tmp_path, prv_rows, capsys):
    # Prepare: a site's state folder as the ClientApp leaves it: ledger.jsonl beside train_log.jsonl
    state = tmp_path / "state"
    key = LedgerKey.load_or_create(state / "ledger_key.pem")
    for f in prv_rows:
        Ledger(state / "ledger.jsonl").append(f, key)
    (state / "train_log.jsonl").write_text('{"run_id": "run-1", "round": 1, "steps": 250, "epsilon": 0.5}\n')
    keys = tmp_path / "keys"
    publish_key(keys, "site-a", key)
    publish_key(keys, "site-b", LedgerKey.generate())  # another site's key: not about this ledger
    # Execute / Assert: the client id comes from the entries, the training log is not read as a ledger
    for path in (state, state / "ledger.jsonl"):
        for pinned in (None, keys):
            report = audit_path(path, keys=pinned)
            assert list(report.clients) == ["site-a"] and report.exit_status == 0, format_report(report)
            assert report.clients["site-a"].rounds == 4
    assert main(["audit", str(state), "--keys", str(keys)]) == 0
    # a ledger signed by another key than the pinned one is still caught
    publish_key(keys, "site-a", LedgerKey.generate())
    assert main(["audit", str(state / "ledger.jsonl"), "--keys", str(keys)]) == EXIT_CODES[TAMPERING]
