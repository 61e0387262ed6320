"""Ledger: signing, chaining, crash-safe appends, and detection of every kind of tampering."""

from __future__ import annotations

import hashlib
import math
import os
import stat

import pytest

from common.privacy import ledger as ledger_mod
from common.privacy.ledger import (
    ACCOUNTING,
    CORRUPT,
    GENESIS_HASH,
    TAMPERING,
    Ledger,
    LedgerError,
    LedgerKey,
    canonical_json,
    check_chain,
    compare_copies,
    decode_entry,
    encode_entry,
    entry_fields,
    entry_hash,
    read_ledger,
    verify_chain,
)


def fields(round_: int, epsilon: float, *, run_id: str = "run-1", status: str = "trained", **over) -> dict:
    """Entry fields of one DP round (sigma 1.1, q 0.01, 100 steps)."""
    kw = dict(
        run_id=run_id,
        client_id="site-a",
        round=round_,
        status=status,
        noise_multiplier=1.1,
        sample_rate=0.01,
        steps=0 if status == "refused-budget" else 100,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant="prv",
        epsilon=epsilon,
        budget=8.0,
        update_hash=None if status == "refused-budget" else "ab" * 32,
        modalities=["acc", "gyro"],
    )
    kw.update(over)
    return entry_fields(**kw)


def resign(entry: dict, key: LedgerKey) -> dict:
    """Re-hash and re-sign an entry as it is (a forger with ``key``)."""
    entry = dict(entry)
    entry["entry_hash"] = entry_hash(entry)
    entry["signature"] = key.sign(bytes.fromhex(entry["entry_hash"])).hex()
    return entry


def write_lines(path, entries) -> None:
    path.write_text("".join(encode_entry(e) + "\n" for e in entries))


@pytest.fixture
def key(tmp_path) -> LedgerKey:
    return LedgerKey.load_or_create(tmp_path / "state" / "ledger_key.pem")


@pytest.fixture
def three(tmp_path, key) -> list[dict]:
    """A valid three-round ledger in tmp_path/ledger.jsonl."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for r, eps in [(1, 0.5), (2, 0.8), (3, 1.0)]:
        ledger.append(fields(r, eps), key)
    return ledger.entries()


# --- keys ---------------------------------------------------------------------------------------


def test_key_file_is_0600_pkcs8_and_reloaded(tmp_path):
    # Prepare
    path = tmp_path / "state" / "ledger_key.pem"
    old = os.umask(0)  # even with a permissive umask the key must never be readable by others
    try:
        # Execute
        key = LedgerKey.load_or_create(path)
    finally:
        os.umask(old)
    again = LedgerKey.load_or_create(path)
    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert again.public_hex == key.public_hex and len(key.public_hex) == 64
    assert [p.name for p in path.parent.iterdir()] == ["ledger_key.pem"]  # no temp file left


def test_unreadable_key_file_raises_ledger_error(tmp_path):
    path = tmp_path / "ledger_key.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(LedgerError, match="cannot load the ledger key"):
        LedgerKey.load_or_create(path)


# --- format -------------------------------------------------------------------------------------


def test_entry_format_hash_and_signature(tmp_path, key, three):
    # Prepare
    first = three[0]
    body = {k: v for k, v in first.items() if k not in ("entry_hash", "signature")}
    # Assert: every field of the documented format, chained and signed
    assert set(first) == {
        "version",
        "run_id",
        "client_id",
        "round",
        "status",
        "private",
        "mechanism",
        "delta",
        "accountant",
        "epsilon",
        "budget",
        "run_epsilon",
        "run_budget",
        "modalities",
        "time",
        "update_hash",
        "public_key",
        "prev_hash",
        "index",
        "entry_hash",
        "signature",
    }
    assert first["mechanism"] == {"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0}
    assert first["prev_hash"] == GENESIS_HASH and first["index"] == 0 and first["time"].endswith("Z")
    assert first["entry_hash"] == hashlib.sha256(b"\x00" + canonical_json(body)).hexdigest()
    assert canonical_json({"b": 1, "a": "é"}) == b'{"a":"\\u00e9","b":1}'
    assert three[1]["prev_hash"] == first["entry_hash"] and three[2]["index"] == 2
    assert ledger_mod.verify_signature(key.public_hex, bytes.fromhex(first["entry_hash"]), first["signature"])
    # one canonical JSON line per entry
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert lines == [encode_entry(e) for e in three]


def test_valid_multi_round_ledger_with_refusal_verifies(tmp_path, key):
    # Prepare
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for r, eps in [(1, 3.0), (2, 5.0), (3, 7.5)]:
        ledger.append(fields(r, eps), key)
    # Execute
    refused = ledger.append(fields(4, 7.5, status="refused-budget"), key)
    # Assert
    assert refused["mechanism"]["steps"] == 0 and refused["update_hash"] is None
    assert verify_chain(ledger.entries(), expected_public_key=key.public_hex) == []
    assert ledger.last_hash == refused["entry_hash"]


def test_resumed_run_continues_the_same_chain(tmp_path, key):
    # Prepare: run-1 rounds 1-3, then a resumed run (new run_id) restarts its round numbers
    client = Ledger(tmp_path / "ledger.jsonl")
    server = Ledger(tmp_path / "run-2" / "ledgers" / "site-a.jsonl")
    for r, eps in [(1, 0.5), (2, 0.8), (3, 1.0)]:
        client.append(fields(r, eps), key)
    # Execute
    for r, eps in [(1, 1.2), (2, 1.4)]:
        client.append(fields(r, eps, run_id="run-2"), key)
    for e in client.entries():  # the new run's server receives the whole chain first
        server.append_signed(e, expected_public_key=key.public_hex)
    # Assert
    entries = client.entries()
    assert [e["index"] for e in entries] == [0, 1, 2, 3, 4]
    assert verify_chain(entries) == []
    assert compare_copies(entries, server.entries()) == []


def test_non_private_training_is_representable(tmp_path, key):
    # Prepare
    ledger = Ledger(tmp_path / "ledger.jsonl")
    # Execute
    entry = ledger.append(fields(1, math.inf, budget=math.inf, noise_multiplier=0.0, max_grad_norm=None), key)
    # Assert
    assert entry["private"] is False
    assert (entry["epsilon"], entry["budget"], entry["delta"], entry["accountant"]) == (None, None, None, None)
    assert verify_chain(ledger.entries()) == []


def test_wire_encoding_round_trips(three):
    text = encode_entry(three[1])
    assert decode_entry(text) == three[1]
    with pytest.raises(LedgerError):
        decode_entry("{not json")
    with pytest.raises(LedgerError):
        decode_entry("[1, 2]")


# --- tampering ----------------------------------------------------------------------------------


def test_edited_field_is_detected(three):
    # Prepare
    edited = [dict(e) for e in three]
    edited[1]["epsilon"] = 0.1
    # Execute
    problems = verify_chain(edited)
    # Assert
    assert any("entry 1: content does not match its entry_hash" in p for p in problems)


def test_edited_and_rehashed_entry_fails_its_signature(three):
    edited = [dict(e) for e in three]
    edited[1]["mechanism"] = dict(edited[1]["mechanism"], steps=10)
    edited[1]["entry_hash"] = entry_hash(edited[1])
    problems = verify_chain(edited)
    assert any("entry 1: signature does not verify" in p for p in problems)
    assert any("entry 2: prev_hash does not match entry 1" in p for p in problems)


def test_reordered_entries_are_detected(three):
    problems = verify_chain([three[0], three[2], three[1]])
    assert any("entry 1: its index is 2" in p for p in problems)
    assert any("entry 2: prev_hash does not match" in p for p in problems)
    assert any("round 2 does not follow round 3" in p for p in problems)


def test_dropped_middle_entry_is_detected(three):
    problems = verify_chain([three[0], three[2]])
    assert any("entry 1: its index is 2" in p for p in problems)
    assert any("entry 1: prev_hash does not match entry 0" in p for p in problems)


def test_truncated_federation_copy_is_detected(three):
    # A chain cut after whole entries still verifies on its own: the other copy shows it.
    assert verify_chain(three[:2]) == []
    problems = compare_copies(three, three[:2])
    assert problems == [
        "the federation's copy has 2 entries, the client's copy 3: the federation's copy is truncated (or the "
        "client's last replies never reached the server)"
    ]
    assert "client's copy is truncated" in compare_copies(three[:1], three)[0]


def test_copies_with_different_entries_are_detected(three, key):
    other = [dict(e) for e in three]
    other[2] = resign(dict(other[2], epsilon=0.9), key)
    assert compare_copies(three, other) == ["entry 2 differs between the client's copy and the federation's copy"]


def test_torn_last_line_is_reported_not_raised(tmp_path, three):
    # Prepare: a write cut short in the middle of the last line
    path = tmp_path / "ledger.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    # Execute
    entries, problems = read_ledger(path)
    # Assert
    assert entries == three[:2]
    assert problems == [
        f"{path}: line 3 has no line end: a partial last line (a write was cut short, or the file was truncated); it was ignored"
    ]
    with pytest.raises(LedgerError, match="does not verify"):
        Ledger(path).entries()


def test_garbage_and_missing_files_are_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n[1]\n')
    entries, problems = read_ledger(path)
    assert entries == [{"a": 1}]
    assert len(problems) == 2 and "line 2 is not valid JSON" in problems[0] and "line 3 is a JSON list" in problems[1]
    assert any("missing field 'entry_hash'" in p for p in verify_chain(entries))
    assert read_ledger(tmp_path / "missing.jsonl")[1][0].startswith("cannot read")


def test_forged_entry_signed_with_another_key_is_detected(three, key):
    # Prepare: a forger appends an entry signed with their own key...
    mallory = LedgerKey.generate()
    forged = resign(dict(three[2], round=4, index=3, prev_hash=three[2]["entry_hash"], public_key=mallory.public_hex), mallory)
    # ... or keeps the client's public key but cannot produce its signature
    impostor = resign(dict(forged, public_key=key.public_hex), mallory)
    # Execute
    own_key = verify_chain(three + [forged])
    claimed_key = verify_chain(three + [impostor])
    # Assert
    assert any("entry 3: signed by key" in p and "not entry 0's" in p for p in own_key)
    assert any("entry 3: signature does not verify" in p for p in claimed_key)


def test_whole_ledger_re_signed_with_a_different_key_is_detected(three, key):
    # Prepare: every entry re-chained and re-signed consistently with another key
    mallory = LedgerKey.generate()
    forged, prev = [], GENESIS_HASH
    for e in three:
        f = resign(dict(e, public_key=mallory.public_hex, prev_hash=prev), mallory)
        forged.append(f)
        prev = f["entry_hash"]
    # Assert: self-consistent, but not the client's key, and not the client's copy
    assert verify_chain(forged) == []
    assert all("not the expected key's" in p for p in verify_chain(forged, expected_public_key=key.public_hex))
    assert len(verify_chain(forged, expected_public_key=key.public_hex)) == 3
    assert len(compare_copies(three, forged)) == 3


def test_key_change_mid_chain_is_detected(tmp_path, three):
    new_key = LedgerKey.generate()
    e = resign(dict(three[2], round=4, index=3, prev_hash=three[2]["entry_hash"], public_key=new_key.public_hex), new_key)
    findings = check_chain(three + [e])
    assert [f.kind for f in findings] == [TAMPERING] and findings[0].entry == 3


def test_falling_epsilon_is_an_accounting_finding(three, key):
    e = resign(dict(three[2], round=4, index=3, prev_hash=three[2]["entry_hash"], epsilon=0.2), key)
    findings = check_chain(three + [e])
    assert findings == [
        ledger_mod.Finding(
            ACCOUNTING, "entry 3: epsilon fell from 1 to 0.2 (epsilon is cumulative: was the accountant reset?)", 3
        )
    ]


def test_malformed_fields_are_corrupt_findings(three, key):
    e = resign(dict(three[0], delta=2.0), key)
    findings = check_chain([e])
    assert [(f.kind, f.message) for f in findings] == [(CORRUPT, "entry 0: field 'delta' must be a number in (0, 1), got 2.0")]


# --- appending ----------------------------------------------------------------------------------


def test_append_refuses_when_the_file_no_longer_verifies(tmp_path, key, three):
    # Prepare: someone edits entry 1 on disk
    path = tmp_path / "ledger.jsonl"
    edited = [dict(e) for e in three]
    edited[1]["epsilon"] = 0.1
    write_lines(path, edited)
    before = path.read_bytes()
    # Execute / Assert
    with pytest.raises(LedgerError, match="does not verify, nothing was appended"):
        Ledger(path).append(fields(4, 1.2), key)
    assert path.read_bytes() == before


def test_append_rejects_inconsistent_fields(tmp_path, key):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(LedgerError, match="a refused round must record steps 0"):
        ledger.append(fields(1, 0.0, status="refused-budget", steps=5), key)
    with pytest.raises(LedgerError, match="must not set"):
        ledger.append(dict(fields(1, 0.5), index=0), key)
    with pytest.raises(LedgerError, match="noise_multiplier"):
        ledger.append(fields(1, 0.5, noise_multiplier=0.0), key)
    ledger.append(fields(2, 0.5), key)
    with pytest.raises(LedgerError, match="round 2 does not follow round 2"):
        ledger.append(fields(2, 0.6), key)
    assert len(ledger.entries()) == 1


def test_crash_during_a_write_leaves_the_previous_ledger(tmp_path, key, three, monkeypatch):
    # Prepare: the process dies between writing the temp file and renaming it
    path = tmp_path / "ledger.jsonl"
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(ledger_mod.os, "replace", crash)
    # Execute
    with pytest.raises(OSError, match="simulated crash"):
        Ledger(path).append(fields(4, 1.2), key)
    # Assert
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl", "state"]


def test_append_signed_builds_the_federation_copy(tmp_path, key, three):
    # Prepare
    server = Ledger(tmp_path / "ledgers" / "site-a.jsonl")
    # Execute
    for e in three:  # as received: a JSON string in the Flower reply
        server.append_signed(decode_entry(encode_entry(e)), expected_public_key=key.public_hex)
    server.append_signed(three[1])  # a re-sent entry is a no-op
    # Assert
    assert server.entries() == three
    assert compare_copies(three, server.entries()) == []


def test_append_signed_rejects_entries_that_do_not_extend_the_chain(tmp_path, key, three):
    # Prepare
    server = Ledger(tmp_path / "srv.jsonl")
    server.append_signed(three[0])
    mallory = LedgerKey.generate()
    # Assert: skipping an entry, a forged signature, another key, a fork at a taken position
    with pytest.raises(LedgerError, match=r"must send entries 1\.\.1 first"):
        server.append_signed(three[2])
    with pytest.raises(LedgerError, match="prev_hash does not match"):
        server.append_signed(dict(three[2], index=1))
    with pytest.raises(LedgerError, match="signature does not verify"):
        server.append_signed(dict(three[1], signature=mallory.sign(bytes.fromhex(three[1]["entry_hash"])).hex()))
    with pytest.raises(LedgerError, match="not the expected key"):
        server.append_signed(three[1], expected_public_key=mallory.public_hex)
    with pytest.raises(LedgerError, match="forked"):
        server.append_signed(resign(dict(three[0], epsilon=0.4), key))
    with pytest.raises(LedgerError, match="content does not match"):
        server.append_signed(dict(three[1], epsilon=0.1))
    assert server.entries() == three[:1]
