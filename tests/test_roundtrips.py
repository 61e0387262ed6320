"""Property tests: a run config survives TOML, a ledger entry survives its wire encoding (Hypothesis)."""

from __future__ import annotations

import math
import tempfile
import tomllib
from pathlib import Path

import hypothesis.strategies as st
import tomli_w
from hypothesis import given, settings

from common.config import ACCOUNTANTS, STRATEGIES, flatten, parse_run_config, unflatten
from common.model.fusion import FUSIONS
from common.privacy.ledger import (
    STATUSES,
    Ledger,
    LedgerKey,
    decode_entry,
    encode_entry,
    entry_fields,
    entry_hash,
    format_problems,
    verify_chain,
    verify_signature,
)

KEY = LedgerKey.generate()
budgets = st.one_of(st.floats(0.01, 100.0), st.just(math.inf))
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)

run_configs = st.fixed_dictionaries(
    {
        "num-server-rounds": st.integers(1, 10_000),
        "strategy": st.sampled_from(STRATEGIES),
        "seed": st.integers(0, 2**31 - 1),
        "out-dir": text,
        "model.fusion": st.sampled_from(FUSIONS),
        "model.embed-dim": st.integers(1, 512),
        "train.lr": st.floats(1e-6, 10.0),
        "train.batch-size": st.integers(1, 4096),
        "dp.epsilon": budgets,
        "dp.delta": st.floats(1e-12, 0.5),
        "dp.accountant": st.sampled_from(ACCOUNTANTS),
        "data.num-clients": st.integers(1, 1000),
        "release.train-metrics": st.booleans(),
        "federation.labels": text,
    }
)


@settings(max_examples=60, deadline=None)
@given(run_configs)
def test_a_run_config_written_as_toml_reads_back_the_same(overrides):
    # Prepare: a valid configuration, as `fedfuse simulate` hands it to Flower
    config = parse_run_config(overrides)
    # Execute: the app folder's pyproject.toml / a deployment's run-config file, written with tomli-w and read back
    doc = tomli_w.dumps(unflatten(config.to_flat()))
    again = parse_run_config(flatten(tomllib.loads(doc)))
    # Assert
    assert again == config and again.to_flat() == config.to_flat()


entries = st.builds(
    entry_fields,
    run_id=st.text(min_size=1, max_size=20),
    client_id=st.text(min_size=1, max_size=20),
    round=st.integers(0, 10_000),
    status=st.just(STATUSES[0]),
    noise_multiplier=st.floats(0.01, 100.0),
    sample_rate=st.floats(1e-6, 1.0),
    steps=st.integers(1, 10**6),
    max_grad_norm=st.floats(1e-3, 100.0),
    delta=st.floats(1e-12, 0.5),
    accountant=st.sampled_from(ACCOUNTANTS),
    epsilon=st.floats(0.0, 1000.0),
    budget=budgets,
    update_hash=st.text("0123456789abcdef", min_size=64, max_size=64),
    modalities=st.lists(text, max_size=4),
    run_epsilon=st.one_of(st.none(), st.floats(0.0, 1000.0)),
    run_budget=st.one_of(st.none(), budgets),
)


@settings(max_examples=25, deadline=None)
@given(entries)
def test_a_signed_ledger_entry_survives_its_wire_encoding(fields):
    # Prepare: a real signed chain on disk
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "ledger.jsonl")
        signed = [ledger.append(fields, KEY)]
        # Execute: what a client sends and the server decodes
        received = [decode_entry(encode_entry(e)) for e in signed]
        # Assert: the same entries, still hashing and verifying as signed, and the file holds them too
        assert received == signed == ledger.entries()
        for entry in received:
            assert entry_hash(entry) == entry["entry_hash"] and format_problems(entry) == []
            assert verify_signature(KEY.public_hex, bytes.fromhex(entry["entry_hash"]), entry["signature"])
        assert verify_chain(received) == []
