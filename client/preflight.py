"""Start-time checks of a deployed site, run by ``fedfuse site supernode`` before Flower starts.

The node config (``--node-config``), the data folder (the full validation of ``fedfuse data validate``)
and the state folder (privacy record, ledger and ledger key readable, consistent, and this site's). A
site that fails any check does not start, so it never shows online with a folder that would fail its
first task. The report is printed at the site only: nothing has been sent anywhere yet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError


@dataclass
class StartReport:
    """What the checks found: ``problems`` (the site must not start) and ``facts`` (logged when it does)."""

    problems: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)


def node_config_from_args(flower_args: list[str]) -> dict[str, Any]:
    """The ``--node-config`` of flower-supernode's options, parsed as Flower parses it."""
    import argparse

    from flwr.common.config import parse_config_args

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--node-config")
    known, _ = p.parse_known_args(flower_args)
    if not known.node_config:
        return {}
    try:
        return dict(parse_config_args([known.node_config]))
    except Exception as exc:  # Flower raises click's exception (or ValueError, OSError for a .toml file)
        raise ConfigError(
            f"--node-config cannot be read ({getattr(exc, 'message', exc)}); write it as "
            '\'data-dir="/srv/site/data" state-dir="/srv/site/state" max-epsilon=8.0\''
        ) from exc


def check_start(node_config: Mapping[str, Any]) -> StartReport:
    """Check a deployed site's node config, data folder and state folder; every problem, not only the first."""
    from client.site import site_policy

    report = StartReport()
    if "data-dir" not in node_config:
        report.problems.append(
            'the node config names no data: give --node-config \'data-dir="/path/to/site" '
            'state-dir="/path/to/state" max-epsilon=8.0\' (see README, Deploy)'
        )
        return report
    try:
        max_epsilon, max_delta = site_policy(node_config)
    except ConfigError as exc:
        report.problems.append(str(exc))
        return report
    report.facts.append(
        f"policy: at most ε = {max_epsilon:g} over the site's whole history"
        + (f", δ ≤ {max_delta:g}" if max_delta is not None else "")
    )
    client_id, modalities = _check_data(Path(str(node_config["data-dir"])).expanduser(), node_config, report)
    _check_state(Path(str(node_config["state-dir"])).expanduser(), client_id, modalities, report)
    return report


def _check_data(path: Path, node_config: Mapping[str, Any], report: StartReport) -> tuple[str | None, tuple[str, ...] | None]:
    from common.data.site_folders import check_site, summarize_site

    site, problems = check_site(path)
    if site is None:
        report.problems += [f"data-dir {path}: {p}" for p in problems]
        return (str(node_config["client-id"]) if node_config.get("client-id") else None), None
    summary = summarize_site(site)
    if "train" not in summary["splits"]:
        report.problems.append(
            f"data-dir {path}: no sample is in split 'train' (splits: {summary['splits']}); a site needs training samples"
        )
    else:
        from client.site import declared_examples

        try:  # the public training-set size the DP mechanism is derived from (num-train-examples)
            declared_examples(node_config, summary["splits"]["train"])
        except ConfigError as exc:
            report.problems.append(str(exc))
    client_id = str(node_config.get("client-id") or site.name)
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    report.facts.append(
        f"data-dir {path}: site '{site.name}', {summary['samples']} samples ({splits}), modalities {', '.join(site.schema.names)}"
    )
    return client_id, site.schema.names


def _check_state(path: Path, client_id: str | None, modalities: tuple[str, ...] | None, report: StartReport) -> None:
    from client.state import PRIVACY_FILE, ClientState, StateError
    from common.privacy.ledger import KEY_FILE, LEDGER_FILE, LedgerError, LedgerKey, read_ledger, verify_chain

    where = f"state-dir {path}"
    if not path.exists():  # created (with its parents) at the first task: the nearest existing folder must allow it
        ancestor = next(p for p in path.parents if p.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            report.problems.append(f"{where}: does not exist and cannot be created in {ancestor} (not a writable folder)")
        else:
            report.facts.append(f"{where}: new (created at the first task)")
        return
    if not path.is_dir():
        report.problems.append(f"{where}: not a folder")
        return
    if not os.access(path, os.W_OK | os.X_OK):
        report.problems.append(f"{where}: this user cannot write to it")
    found = len(report.problems)

    # The privacy record: readable, and this site's (the client id and modalities it was started with)
    record = None
    if (path / PRIVACY_FILE).exists():
        try:
            doc = json.loads((path / PRIVACY_FILE).read_text())
            stored = doc if isinstance(doc, dict) else {}
            accountant = str((stored.get("privacy") or {}).get("accountant", "prv"))
            record = ClientState(path).load_record(
                client_id=client_id or str(stored.get("client_id")),
                modalities=modalities if modalities is not None else tuple(stored.get("modalities") or ()),
                accountant=accountant,
            )
        except (OSError, ValueError, AttributeError) as exc:
            report.problems.append(
                f"{where}: {PRIVACY_FILE} is unreadable ({exc}); it holds this site's privacy history: restore it from a backup"
            )
        except StateError as exc:
            report.problems.append(f"{where}: {exc}")

    # The ledger: readable, one valid chain, this site's, signed with the key in the folder
    entries: list[Any] = []
    if (path / LEDGER_FILE).exists():
        entries, unreadable = read_ledger(path / LEDGER_FILE)
        report.problems += [f"{where}: {p}" for p in unreadable]
        report.problems += [f"{where}: {LEDGER_FILE}: {p}" for p in verify_chain(entries)]
        owners = {e.get("client_id") for e in entries if isinstance(e, dict)}
        if client_id is not None and owners - {client_id}:
            report.problems.append(
                f"{where}: {LEDGER_FILE} belongs to client {sorted(map(str, owners))}, not "
                f"'{client_id}'; use this site's own state folder (or set client-id)"
            )
    key_path = path / KEY_FILE
    if key_path.exists():
        try:
            key = LedgerKey.load_or_create(key_path)
            signed_with = {e.get("public_key") for e in entries if isinstance(e, dict)}
            if signed_with and signed_with != {key.public_hex}:
                report.problems.append(
                    f"{where}: {LEDGER_FILE} was signed with another key than {KEY_FILE}; restore this site's own ledger key"
                )
        except LedgerError as exc:
            report.problems.append(f"{where}: {exc}")
    elif entries:
        report.problems.append(
            f"{where}: {LEDGER_FILE} has {len(entries)} entries but {KEY_FILE} is missing; "
            "restore the key that signed them (a new key would break the ledger's chain)"
        )
    if len(report.problems) == found:
        spent = next((e.get("epsilon") for e in reversed(entries) if isinstance(e, dict) and e.get("epsilon")), None)
        rounds = len(record.rounds) if record is not None else 0
        report.facts.append(
            f"{where}: {rounds} round(s) trained so far, {len(entries)} ledger entries"
            + (f", ε so far {spent:.3g}" if isinstance(spent, (int, float)) else "")
        )
