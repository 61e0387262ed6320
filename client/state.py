"""A client's private state folder: its encoders, accountant history, last reply and privacy ledger.

Layout::

    <state>/privacy.json        accountant history, noise plan, rounds trained and the last round's
                                ledger entry (written FIRST)
    <state>/model.safetensors   the client's encoders and its local copy of the head, tagged with the run
                                and round that trained it and the names of the blocks sent: that round's
                                update (re-sent, not retrained, if the server asks for the same round
                                again after a crash) is those blocks of this file
    <state>/ledger.jsonl        signed privacy ledger (common/privacy/ledger.py)
    <state>/ledger_key.pem      the ledger's Ed25519 signing key (mode 0600)
    <state>/train_log.jsonl     one line per round trained (time, steps, epsilon, training loss): for the
                                site's own operators, never sent
    <state>/state.lock          held while a round runs, so two processes never share a state

A state folder whose ``privacy.json`` is missing but whose ledger holds entries is rebuilt from the
ledger (after verifying its chain and its key), never started afresh: the ledger records every round's
mechanism, so the history, and so ε, continue where they were. An unreadable ``privacy.json``, one
that charges fewer rounds than the ledger (an old backup), a ledger that does not verify, or a trained
model with neither record stops training with a clear error.

Every file is replaced atomically. ``privacy.json`` is written (and made durable) before the ledger
entry and the model, so a crash between the writes can only over-count privacy spend, never
under-count it; a ledger entry lost to such a crash is signed from ``privacy.json`` on the next
start, so the ledger always explains the history's epsilon. The ledger and the model of a round are
each fsynced, and their renames made durable with one fsync of the folder (:meth:`ClientState.sync`)
before the reply leaves. Older versions kept the last update in a separate ``reply.safetensors``; it
is still read, and removed when a round is saved.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from common.errors import FedfuseError, PrivacyParameterError
from common.fileio import atomic_save_tensors, atomic_write_json, fsync_dir, json_safe, load_tensors
from common.privacy.accounting import HISTORY_FORMAT, PrivacyHistory
from common.privacy.ledger import CORRUPT, KEY_FILE, LEDGER_FILE, TAMPERING, LedgerKey, check_chain, read_ledger

PRIVACY_FILE = "privacy.json"
MODEL_FILE = "model.safetensors"
REPLY_FILE = "reply.safetensors"  # the last update, written by versions before the model carried it
STAGED_FILE = "model.staged.safetensors"  # a round's trained model, written before its charge, the model after it
TRAIN_LOG = "train_log.jsonl"
LOCK_FILE = "state.lock"
STATE_FORMAT = 1

log = logging.getLogger("fedfuse.state")


class StateError(FedfuseError):
    """The state folder is unreadable, belongs to another client, or is in use."""


@dataclass
class ClientRecord:
    """What ``privacy.json`` holds besides the accountant history."""

    client_id: str
    modalities: tuple[str, ...]
    history: PrivacyHistory
    rounds: list[list[Any]] = field(default_factory=list)  # [[run_id, round], ...] trained rounds
    # The unsigned ledger entry of the last round charged to ``history``, saved in the same write, so that
    # an entry lost to a crash before it reached the ledger is signed on the next start (client/handlers.py).
    pending: dict[str, Any] | None = None

    def trained(self, run_id: str, server_round: int) -> bool:
        return [run_id, server_round] in self.rounds

    def rounds_in_run(self, run_id: str) -> int:
        return sum(1 for r, _ in self.rounds if r == run_id)


class ClientState:
    """Read and write one client's state folder."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)

    @contextmanager
    def locked(self) -> Iterator[ClientState]:
        """Hold the folder's lock for a round; a second process gets a clear error, not a corrupt state.

        On the way out, on every path, the folder is fsynced: what the round wrote with ``sync_dir=False`` (its
        ledger entry, its model) is durable before the lock is released and before any reply leaves."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(
                    f"state folder {self.folder} is in use by another process; each client needs its own state folder"
                ) from None
            try:
                yield self
            finally:  # renames written with sync_dir=False: durable before the lock is released, on every path
                self.sync()
        finally:
            os.close(fd)

    # --- privacy record --------------------------------------------------------------------------
    def load_record(self, *, client_id: str, modalities: tuple[str, ...], accountant: str) -> ClientRecord:
        """The stored record, or a fresh one for a new client. Refuses a folder of another client."""
        path = self.folder / PRIVACY_FILE
        if not path.exists():
            record = self._rebuild(client_id=client_id, accountant=accountant)
            if record is None:
                return ClientRecord(client_id, tuple(modalities), PrivacyHistory(accountant=accountant))
            log.warning(
                "%s: %s is missing; rebuilt from the verified ledger (%d rounds, %d mechanisms)",
                client_id,
                path,
                len(record.rounds),
                len(record.history.entries),
            )
            self._check(record, client_id=client_id, modalities=modalities, accountant=accountant)
            self.save_record(record)
            return record
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            record = ClientRecord(
                client_id=doc["client_id"],
                modalities=tuple(doc["modalities"]),
                history=PrivacyHistory.from_dict(doc["privacy"]),
                rounds=[list(r) for r in doc["rounds"]],
                pending=doc.get("pending"),
            )
        except (OSError, ValueError, KeyError, TypeError, PrivacyParameterError) as exc:
            raise StateError(
                f"{path} is unreadable ({exc}); it holds this client's privacy history, so training stops rather "
                f"than start a new budget. Restore it from a backup, or move it away: the next round then rebuilds "
                f"it from the signed ledger {LEDGER_FILE}."
            ) from exc
        self._check(record, client_id=client_id, modalities=modalities, accountant=accountant)
        charged = self._charged_in_ledger()
        if charged > len(record.history.entries):
            raise StateError(
                f"{path} records {len(record.history.entries)} rounds that used the data, but the ledger "
                f"{self.folder / LEDGER_FILE} records {charged}: the history is older than the ledger (restored from "
                "an old backup?), and training on it would under-count this client's privacy spend. Move "
                f"{PRIVACY_FILE} away: the next round rebuilds it from the signed ledger"
            )
        return record

    def _charged_in_ledger(self) -> int:
        """How many rounds the ledger charges (entries with steps > 0); parsed only, verified when rebuilding."""
        path = self.folder / LEDGER_FILE
        if not path.exists():
            return 0
        entries, _ = read_ledger(path)
        return sum(
            1
            for e in entries
            if isinstance(e, dict)
            and isinstance(e.get("mechanism"), dict)
            and isinstance(e["mechanism"].get("steps"), int)
            and e["mechanism"]["steps"] > 0
        )

    def _check(self, record: ClientRecord, *, client_id: str, modalities: tuple[str, ...], accountant: str) -> None:
        """Refuse a record of another client, accountant or set of modalities."""
        if record.client_id != client_id:
            raise StateError(f"{self.folder} belongs to client '{record.client_id}', not '{client_id}'")
        if record.history.accountant != accountant:
            raise StateError(
                f"this client's history was accounted with '{record.history.accountant}'; it cannot switch to "
                f"'{accountant}' (set dp.accountant = \"{record.history.accountant}\")"
            )
        if record.modalities != tuple(modalities):
            raise StateError(
                f"{self.folder} holds encoders for {list(record.modalities)}, but the client now has "
                f"{list(modalities)}; use a new state folder for a different set of modalities"
            )

    def _rebuild(self, *, client_id: str, accountant: str) -> ClientRecord | None:
        """The record the ledger explains, when ``privacy.json`` is gone; None for a client that never trained."""
        ledger_path = self.folder / LEDGER_FILE
        entries, problems = read_ledger(ledger_path) if ledger_path.exists() else ([], [])
        if not entries and not problems:
            if (self.folder / MODEL_FILE).exists():
                raise StateError(
                    f"{self.folder} holds a trained model but neither its privacy history ({PRIVACY_FILE}) nor a "
                    f"ledger ({LEDGER_FILE}); its privacy spend is unknown, so training stops. Restore both from a "
                    "backup, or start a new state folder (the data's earlier spend still counts against it)"
                )
            return None
        restore = f"Restore {PRIVACY_FILE} from a backup; keep {LEDGER_FILE} as evidence (`fedfuse audit {self.folder}`)"
        key_file = self.folder / KEY_FILE
        pinned = LedgerKey.load_or_create(key_file).public_hex if key_file.exists() else None
        bad = problems + [f.message for f in check_chain(entries, expected_public_key=pinned) if f.kind in (TAMPERING, CORRUPT)]
        if bad:
            raise StateError(
                f"{PRIVACY_FILE} is missing and the ledger {ledger_path} does not verify "
                f"({'; '.join(bad[:3])}), so the privacy history cannot be rebuilt. {restore}"
            )
        if pinned is None:
            raise StateError(
                f"{PRIVACY_FILE} and the ledger key {KEY_FILE} are missing: the ledger {ledger_path} "
                f"cannot be trusted to rebuild the privacy history. {restore}"
            )
        private = [e for e in entries if e.get("private") is True]
        last = entries[-1]
        doc = {
            "format": STATE_FORMAT,
            "client_id": last["client_id"],
            "modalities": last["modalities"],
            "privacy": {
                "format": HISTORY_FORMAT,
                "accountant": private[-1]["accountant"] if private else accountant,
                "delta": private[-1]["delta"] if private else None,
                "history": [
                    [e["mechanism"]["noise_multiplier"], e["mechanism"]["sample_rate"], e["mechanism"]["steps"]]
                    for e in entries
                    if e["mechanism"]["steps"] > 0
                ],
                # a format-1 entry (an older version) names no run: it counts towards the lifetime cap only
                "runs": [e["run_id"] if e.get("version", 1) >= 2 else "" for e in entries if e["mechanism"]["steps"] > 0],
                "plan": None,  # the next round calibrates again, against what the history has spent
            },
            "rounds": [[e["run_id"], e["round"]] for e in entries if e["status"] == "trained"],
        }
        try:
            return ClientRecord(
                client_id=doc["client_id"],
                modalities=tuple(doc["modalities"]),
                history=PrivacyHistory.from_dict(doc["privacy"]),
                rounds=doc["rounds"],
            )
        except PrivacyParameterError as exc:
            raise StateError(
                f"{PRIVACY_FILE} is missing and the ledger {ledger_path} records rounds this fedfuse "
                f"cannot rebuild a history from ({exc}). {restore}"
            ) from exc

    def save_record(self, record: ClientRecord) -> None:
        atomic_write_json(
            self.folder / PRIVACY_FILE,
            {
                "format": STATE_FORMAT,
                "client_id": record.client_id,
                "modalities": list(record.modalities),
                "privacy": record.history.to_dict(),
                "rounds": record.rounds,
                "pending": record.pending,
            },
        )

    # --- tensors -----------------------------------------------------------------------------------
    def load_model(self) -> dict[str, torch.Tensor] | None:
        path = self.folder / MODEL_FILE
        return load_tensors(path) if path.exists() else None

    def save_model(self, state: dict[str, torch.Tensor]) -> None:
        atomic_save_tensors(self.folder / MODEL_FILE, state)

    def stage_trained(
        self, state: dict[str, torch.Tensor], *, shared: list[str], run_id: str, server_round: int, metrics: dict[str, Any]
    ) -> None:
        """Write round (``run_id``, ``server_round``)'s trained model before the round is charged; :meth:`commit_trained`
        makes it the model once the charge is durable. A crash in between leaves it staged, and :meth:`settle_staged`
        finds it at the next round: the round's update is not lost with it (see there)."""
        missing = [k for k in shared if k not in state]
        if missing:
            raise ValueError(f"the update's blocks {missing[:3]} are not in the model")
        meta = {"run_id": run_id, "round": str(server_round), "metrics": json.dumps(metrics), "shared": json.dumps(shared)}
        atomic_save_tensors(self.folder / STAGED_FILE, state, metadata=meta, sync_dir=False)  # durable with the charge

    def commit_trained(self) -> None:
        """The staged model becomes the model (the rename is made durable when the lock is released)."""
        os.replace(self.folder / STAGED_FILE, self.folder / MODEL_FILE)
        (self.folder / REPLY_FILE).unlink(missing_ok=True)  # an older version's copy of an earlier update

    def settle_staged(self, record: ClientRecord) -> None:
        """A model staged before a crash: the model, with its update, if its round was charged; else it is deleted
        (trained from the data but never charged, it is never used or sent: the round trains again, charged once)."""
        path = self.folder / STAGED_FILE
        if not path.exists():
            return
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        round_text = meta.get("round", "")
        if round_text.isdigit() and record.trained(meta.get("run_id", ""), int(round_text)):
            self.commit_trained()
        else:
            path.unlink()
        fsync_dir(self.folder)

    def sync(self) -> None:
        """Make the renames of files written with ``sync_dir=False`` durable."""
        fsync_dir(self.folder)

    def load_reply(self, *, run_id: str, server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The update sent for (run, round) and its metrics, if the model (or an older version's reply file) is tagged with it."""
        for name in (MODEL_FILE, REPLY_FILE):
            path = self.folder / name
            if not path.exists():
                continue
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("run_id") != run_id or meta.get("round") != str(server_round):
                    continue
                keys = json.loads(meta["shared"]) if "shared" in meta else list(f.keys())
                arrays = {k: f.get_tensor(k) for k in keys}
            return arrays, json.loads(meta.get("metrics", "{}"))
        return None

    def save_reply(self, arrays: dict[str, torch.Tensor], *, run_id: str, server_round: int, metrics: dict[str, Any]) -> None:
        """Write an update as versions before the model file carried it did (a separate file): for tests of reading it."""
        meta = {"run_id": run_id, "round": str(server_round), "metrics": json.dumps(metrics)}
        atomic_save_tensors(self.folder / REPLY_FILE, arrays, metadata=meta)

    # --- local training log -----------------------------------------------------------------------
    def log_round(self, entry: dict[str, Any]) -> None:
        """Append one line to the site-local training log (diagnostics; never leaves the site)."""
        with open(self.folder / TRAIN_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(entry)) + "\n")

    def training_log(self) -> list[dict[str, Any]]:
        path = self.folder / TRAIN_LOG
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
