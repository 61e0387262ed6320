"""Signed, hash-chained privacy ledger: one JSON Lines file per client (format: docs/ledger-format.md).

Each entry records one round a client trained or refused (mechanism, cumulative epsilon, budget,
hash of the update it sent), is hashed over a canonical JSON encoding with an RFC 6962 style leaf
prefix, chained to the previous entry by ``prev_hash`` and signed with the client's Ed25519 key.
The client keeps its copy in its state folder; the server keeps the federation's copy, appended
with :meth:`Ledger.append_signed`. ``fedfuse audit`` (common/privacy/audit.py) checks both.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.config import ACCOUNTANTS
from common.errors import FedfuseError
from common.fileio import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # the version new entries get
READ_VERSIONS = (1, 2)  # versions this fedfuse verifies (a chain may mix them: v1 entries, then v2)
STATUSES = ("trained", "refused-budget", "discarded")  # discarded: trained, failed, nothing sent
GENESIS_HASH = "0" * 64  # prev_hash of entry 0
LEAF_PREFIX = b"\x00"  # RFC 6962 leaf prefix: an entry hash can never collide with a (future) node hash
UNSIGNED_FIELDS = ("entry_hash", "signature")  # everything else is hashed
CHAIN_FIELDS = ("index", "prev_hash", "public_key", "entry_hash", "signature")  # filled by Ledger.append
KEY_FILE = "ledger_key.pem"
LEDGER_FILE = "ledger.jsonl"

# Finding kinds, most severe first; `fedfuse audit` maps each to an exit status.
TAMPERING, CORRUPT, OVER_BUDGET, ACCOUNTING = "tampering", "corrupt", "over-budget", "accounting"


class LedgerError(FedfuseError):
    """A ledger cannot be read, does not verify, or an entry would not extend its chain."""


class Finding(NamedTuple):
    """One problem found in a ledger: its kind (TAMPERING, CORRUPT, ...) and what is wrong."""

    kind: str
    message: str
    entry: int | None = None  # position of the entry concerned, when there is one


# --- encoding and hashing -----------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, ASCII only, no NaN/inf."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 hex of LEAF_PREFIX + canonical JSON of ``entry`` without entry_hash and signature."""
    body = {k: v for k, v in entry.items() if k not in UNSIGNED_FIELDS}
    return hashlib.sha256(LEAF_PREFIX + canonical_json(body)).hexdigest()


def encode_entry(entry: Mapping[str, Any]) -> str:
    """One entry as a canonical JSON string (a ledger line, or the value sent in a ConfigRecord)."""
    return canonical_json(dict(entry)).decode("ascii")


def decode_entry(text: str) -> dict[str, Any]:
    """Parse an entry sent as a JSON string; LedgerError if it is not a JSON object."""
    try:
        entry = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"ledger entry is not valid JSON ({exc}); the sender must send encode_entry(entry)") from exc
    if not isinstance(entry, dict):
        raise LedgerError(f"ledger entry must be a JSON object, got {type(entry).__name__}")
    return entry


def utc_now() -> str:
    """Current UTC time, ISO 8601 with a Z suffix, microseconds."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- keys ---------------------------------------------------------------------------------------


class LedgerKey:
    """A client's Ed25519 signing key (PKCS8 PEM, mode 0600, in its state folder)."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_hex = raw.hex()

    @classmethod
    def generate(cls) -> LedgerKey:
        """A fresh key held in memory only."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> LedgerKey:
        """Load the key at ``path``; create it (mode 0600 from the start) if there is none."""
        path = Path(path)
        if not path.exists():
            _create_key_file(path, cls.generate())
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("ledger key %s has mode %o: others can read it and forge entries; chmod 600 it", path, mode)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise LedgerError(
                f"cannot load the ledger key {path} ({exc}); restore it from a backup (a new key would "
                "break the client's ledger chain)"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``data``."""
        return self._key.sign(data)

    def pem(self) -> bytes:
        """The private key as unencrypted PKCS8 PEM."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _create_key_file(path: Path, key: LedgerKey) -> None:
    """Write ``key`` to ``path`` atomically, mode 0600 at creation; keep a key that appeared meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key.pem())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, never replaces a key another process created first
        except FileExistsError:
            pass
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def load_public_key_hex(path: str | os.PathLike[str]) -> str:
    """Raw hex of an Ed25519 public key stored as PEM (SubjectPublicKeyInfo, as `fedfuse certs` writes it)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError, OSError) as exc:
        raise LedgerError(f"cannot load the ledger public key {path} ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def verify_signature(public_hex: str, data: bytes, signature_hex: str) -> bool:
    """True when ``signature_hex`` is a valid Ed25519 signature of ``data`` by ``public_hex``."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --- entry fields -------------------------------------------------------------------------------


def entry_fields(
    *,
    run_id: str,
    client_id: str,
    round: int,
    status: str,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    max_grad_norm: float | None,
    delta: float | None,
    accountant: str | None,
    epsilon: float | None,
    budget: float | None,
    update_hash: str | None,
    modalities: list[str] | tuple[str, ...] = (),
    run_epsilon: float | None = None,
    run_budget: float | None = None,
) -> dict[str, Any]:
    """The fields of one entry (format version 2), ready for :meth:`Ledger.append`.

    ``epsilon`` / ``budget``: the client's lifetime epsilon after this entry and the site's lifetime cap
    (``max-epsilon``); ``run_epsilon`` / ``run_budget``: the epsilon of this run's own mechanisms and the
    run's allowance (``dp.epsilon``; default: ``budget``). A run budget of None or inf means non-private
    training: ``"private": false`` and null epsilons, budgets, delta and accountant. An infinite epsilon
    (the history holds non-private training), or no lifetime cap, is written as null (JSON has no infinity).
    """
    run_budget = budget if run_budget is None else run_budget
    private = run_budget is not None and math.isfinite(run_budget)

    def finite(x: float | None) -> float | None:
        return float(x) if private and x is not None and math.isfinite(x) else None

    fields: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "run_id": run_id,
        "client_id": client_id,
        "round": round,
        "status": status,
        "private": private,
        "mechanism": {
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "steps": steps,
            "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
        },
        "delta": float(delta) if private and delta is not None else None,
        "accountant": accountant if private else None,
        "epsilon": finite(epsilon),
        "budget": finite(budget),
        "run_epsilon": finite(run_epsilon),
        "run_budget": finite(run_budget),
        "modalities": list(modalities),
        "update_hash": update_hash,
    }
    return fields


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_hex(x: Any, nbytes: int) -> bool:
    if not isinstance(x, str) or len(x) != 2 * nbytes:
        return False
    try:
        bytes.fromhex(x)
    except ValueError:
        return False
    return x == x.lower()


def format_problems(entry: Any, *, signed: bool = True) -> list[str]:
    """What is wrong with the fields and types of one entry (empty when well-formed)."""
    if not isinstance(entry, dict):
        return [f"entry is a JSON {type(entry).__name__}, not an object"]
    out: list[str] = []

    def need(key: str, ok: bool, what: str) -> None:
        if key not in entry:
            out.append(f"missing field '{key}'")
        elif not ok:
            out.append(f"field '{key}' must be {what}, got {entry[key]!r}")

    g = entry.get
    need("version", g("version") in READ_VERSIONS, f"one of {list(READ_VERSIONS)} (the formats this fedfuse reads)")
    v2 = g("version") == 2
    need("run_id", isinstance(g("run_id"), str) and g("run_id") != "", "a non-empty string")
    need("client_id", isinstance(g("client_id"), str) and g("client_id") != "", "a non-empty string")
    need("round", _is_int(g("round")) and g("round") >= 0, "an integer >= 0")
    need("status", g("status") in STATUSES, f"one of {list(STATUSES)}")
    need("private", isinstance(g("private"), bool), "true or false")
    need(
        "modalities", isinstance(g("modalities"), list) and all(isinstance(m, str) for m in g("modalities")), "a list of strings"
    )
    need("time", isinstance(g("time"), str), "an ISO 8601 string")
    need("update_hash", g("update_hash") is None or _is_hex(g("update_hash"), 32), "null or 64 lower-case hex digits")
    mech = g("mechanism")
    need("mechanism", isinstance(mech, dict), "an object")
    private = g("private") is True
    if isinstance(mech, dict):
        m = mech.get
        sigma = m("noise_multiplier")
        noised = private and g("status") != "refused-budget"  # a refusal ran nothing: its noise may be 0
        if not (_is_num(sigma) and (sigma > 0 if noised else sigma >= 0)):
            out.append(
                f"mechanism.noise_multiplier must be a number {'> 0' if noised else '>= 0'}, got {m('noise_multiplier')!r}"
            )
        if not (_is_num(m("sample_rate")) and 0 < m("sample_rate") <= 1):
            out.append(f"mechanism.sample_rate must lie in (0, 1], got {m('sample_rate')!r}")
        if not (_is_int(m("steps")) and m("steps") >= 0):
            out.append(f"mechanism.steps must be an integer >= 0, got {m('steps')!r}")
        mgn = m("max_grad_norm")
        if not ((_is_num(mgn) and mgn > 0) or (mgn is None and not private)):
            out.append(f"mechanism.max_grad_norm must be a number > 0{'' if private else ' or null'}, got {mgn!r}")
    nullable = ("run_epsilon", "run_budget") if v2 else ()
    if private and v2:  # epsilon null = infinite; budget null = no lifetime cap
        need("delta", _is_num(g("delta")) and 0 < g("delta") < 1, "a number in (0, 1)")
        need("accountant", g("accountant") in ACCOUNTANTS, f"one of {list(ACCOUNTANTS)}")
        for key in ("epsilon", "run_epsilon"):
            need(key, g(key) is None or (_is_num(g(key)) and g(key) >= 0), "a number >= 0 or null (infinite)")
        need("budget", g("budget") is None or (_is_num(g("budget")) and g("budget") > 0), "a number > 0 or null (no cap)")
        need("run_budget", _is_num(g("run_budget")) and g("run_budget") > 0, "a number > 0")
    elif private:
        need("delta", _is_num(g("delta")) and 0 < g("delta") < 1, "a number in (0, 1)")
        need("accountant", g("accountant") in ACCOUNTANTS, f"one of {list(ACCOUNTANTS)}")
        need("epsilon", _is_num(g("epsilon")) and g("epsilon") >= 0, "a number >= 0")
        need("budget", _is_num(g("budget")) and g("budget") > 0, "a number > 0")
    elif "private" in entry:
        for key in ("delta", "accountant", "epsilon", "budget") + nullable:
            need(key, g(key) is None, "null in a non-private entry")
    if signed:
        need("index", _is_int(g("index")) and g("index") >= 0, "an integer >= 0")
        need("prev_hash", _is_hex(g("prev_hash"), 32), "64 lower-case hex digits")
        need("public_key", _is_hex(g("public_key"), 32), "64 lower-case hex digits (raw Ed25519 key)")
        need("entry_hash", _is_hex(g("entry_hash"), 32), "64 lower-case hex digits")
        need("signature", _is_hex(g("signature"), 64), "128 lower-case hex digits")
    return out


# --- verification -------------------------------------------------------------------------------


def check_chain(entries: list[Any], *, expected_public_key: str | None = None, verified: int = 0) -> list[Finding]:
    """Every problem of one copy of a ledger, with its kind (see :func:`verify_chain`).

    ``verified``: how many leading entries were checked already (with the same expected key) and found
    free of tampering and corruption; they are not checked again, only the entries after them, against them.
    """
    found: list[Finding] = []
    ref_key = expected_public_key
    ref_from = "the expected key"
    prev: dict[str, Any] | None = None
    for i, e in enumerate(entries):
        if i < verified:  # checked before: only what the next entries are checked against
            if ref_key is None:
                ref_key, ref_from = e["public_key"], f"entry {i}"
            prev = e
            continue
        where = f"entry {i}"
        bad = format_problems(e)
        if bad:
            found.extend(Finding(CORRUPT, f"{where}: {p}", i) for p in bad)
        if not isinstance(e, dict):
            prev = None
            continue
        # Integrity: hash, signature, key, position in the chain.
        recorded = e.get("entry_hash")
        try:
            actual = entry_hash(e)
        except (TypeError, ValueError) as exc:
            actual = None
            found.append(Finding(CORRUPT, f"{where}: cannot be hashed ({exc})", i))
        if actual is not None and _is_hex(recorded, 32) and recorded != actual:
            found.append(Finding(TAMPERING, f"{where}: content does not match its entry_hash (edited after signing)", i))
        key = e.get("public_key")
        if _is_hex(recorded, 32) and _is_hex(key, 32) and _is_hex(e.get("signature"), 64):
            if not verify_signature(key, bytes.fromhex(recorded), e["signature"]):
                found.append(
                    Finding(TAMPERING, f"{where}: signature does not verify with the entry's public_key (forged or edited)", i)
                )
        if ref_key is None and _is_hex(key, 32):
            ref_key, ref_from = key, f"entry {i}"
        if _is_hex(key, 32) and key != ref_key:
            found.append(
                Finding(
                    TAMPERING,
                    f"{where}: signed by key {key[:16]}..., not {ref_from}'s {ref_key[:16]}... (forged entry or replaced key)",
                    i,
                )
            )
        if _is_int(e.get("index")) and e["index"] != i:
            found.append(
                Finding(TAMPERING, f"{where}: its index is {e.get('index')!r} (entries reordered, dropped or inserted)", i)
            )
        want_prev = GENESIS_HASH if i == 0 else (prev.get("entry_hash") if prev is not None else None)
        if _is_hex(e.get("prev_hash"), 32) and (i == 0 or _is_hex(want_prev, 32)) and e["prev_hash"] != want_prev:
            found.append(
                Finding(
                    TAMPERING,
                    f"{where}: prev_hash does not match "
                    f"{'the genesis value' if i == 0 else f'entry {i - 1}'} "
                    "(an entry was dropped, reordered or inserted)",
                    i,
                )
            )
        # Consistency with the previous entry: same client, rounds increase within a run, epsilon never falls.
        if prev is not None:
            if e.get("client_id") != prev.get("client_id"):
                found.append(
                    Finding(
                        TAMPERING,
                        f"{where}: client_id {e.get('client_id')!r} differs from {prev.get('client_id')!r} in entry {i - 1}",
                        i,
                    )
                )
            same_run = e.get("run_id") == prev.get("run_id")
            r, pr = e.get("round"), prev.get("round")
            if same_run and _is_int(r) and _is_int(pr) and r <= pr:
                found.append(
                    Finding(
                        TAMPERING,
                        f"{where}: round {r} does not follow round {pr} of run {e.get('run_id')!r} (replayed or reordered)",
                        i,
                    )
                )
            comparable = (
                all(e.get(k) == prev.get(k) for k in ("delta", "accountant"))
                and e.get("private") is True
                and prev.get("private") is True
            )
            ep, pp = e.get("epsilon"), prev.get("epsilon")
            if comparable and _is_num(ep) and _is_num(pp) and ep < pp:
                found.append(
                    Finding(
                        ACCOUNTING,
                        f"{where}: epsilon fell from {pp:.6g} to {ep:.6g} (epsilon is cumulative: was the accountant reset?)",
                        i,
                    )
                )
        prev = e
    return found


def verify_chain(entries: list[Any], *, expected_public_key: str | None = None) -> list[str]:
    """Problems of one copy of a ledger (empty list = it verifies).

    Detects edited entries, bad signatures, entries signed by another key than entry 0 (or than
    ``expected_public_key``), reordered, dropped or inserted entries, malformed fields, a change of
    client_id, rounds that do not increase within a run (a new run_id may restart its rounds), and
    a cumulative epsilon that falls (between entries with the same delta and accountant).
    Truncation at the end is only visible against another copy: see :func:`compare_copies`.
    """
    return [f.message for f in check_chain(entries, expected_public_key=expected_public_key)]


def compare_copies(client_entries: list[Any], server_entries: list[Any]) -> list[str]:
    """Differences between the client's copy and the federation's copy (empty list = identical)."""
    out: list[str] = []
    for i, (c, s) in enumerate(zip(client_entries, server_entries)):
        ch = c.get("entry_hash") if isinstance(c, dict) else None
        sh = s.get("entry_hash") if isinstance(s, dict) else None
        if ch != sh or c != s:
            out.append(f"entry {i} differs between the client's copy and the federation's copy")
    nc, ns = len(client_entries), len(server_entries)
    if ns < nc:
        out.append(
            f"the federation's copy has {ns} entries, the client's copy {nc}: the federation's copy is "
            "truncated (or the client's last replies never reached the server)"
        )
    elif nc < ns:
        out.append(
            f"the client's copy has {nc} entries, the federation's copy {ns}: the client's copy is truncated or was rolled back"
        )
    return out


# --- reading and writing ------------------------------------------------------------------------


def read_ledger(path: str | os.PathLike[str]) -> tuple[list[Any], list[str]]:
    """Parse a ledger file: (entries, problems). Never raises for bad content; reports it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [f"cannot read {path}: {exc.strerror or exc}"]
    return _parse(data, str(path))


def _parse(data: bytes, name: str) -> tuple[list[Any], list[str]]:
    entries: list[Any] = []
    problems: list[str] = []
    lines = data.split(b"\n")
    if lines[-1] != b"":
        problems.append(
            f"{name}: line {len(lines)} has no line end: a partial last line (a write was cut short, "
            "or the file was truncated); it was ignored"
        )
    for n, raw in enumerate(lines[:-1], start=1):
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{name}: line {n} is not valid JSON ({exc})")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{name}: line {n} is a JSON {type(entry).__name__}, not an object")
            continue
        entries.append(entry)
    return entries, problems


class Ledger:
    """One copy of a client's ledger, a JSON Lines file; appends are atomic and verified first.

    One writer per file (the client for its own copy, the server app for the federation's copy).
    """

    def __init__(self, path: str | os.PathLike[str], *, sync_dir: bool = True):
        self.path = Path(path)
        # False: each write fsyncs the file but not its folder; the owner calls fsync_dir(path.parent) before it
        # relies on the write (it replaces other files of that folder too, and makes all renames durable at once)
        self.sync_dir = sync_dir
        # What this object last read and verified, or wrote: (the file's stat, its bytes, its entries). Used again
        # only while the file is unchanged (same inode, size, mtime), so a round verifies its ledger once.
        self._verified: tuple[tuple[int, int, int], bytes, list[dict[str, Any]]] | None = None

    @property
    def chain(self) -> list[dict[str, Any]] | None:
        """The whole verified chain as this object last read or wrote it (None before)."""
        return list(self._verified[2]) if self._verified else None

    def entries(self) -> list[dict[str, Any]]:
        """All entries ([] when the file does not exist); LedgerError if a line cannot be read."""
        return self._load()[1]

    @property
    def last_hash(self) -> str:
        """entry_hash of the last entry (GENESIS_HASH for an empty ledger)."""
        entries = self.entries()
        return entries[-1]["entry_hash"] if entries else GENESIS_HASH

    def append(self, fields: Mapping[str, Any], key: LedgerKey) -> dict[str, Any]:
        """Sign ``fields`` (see :func:`entry_fields`) as the next entry, append it and return it."""
        filled = [k for k in CHAIN_FIELDS if k in fields]
        if filled:
            raise LedgerError(f"entry fields must not set {filled}: Ledger.append fills them")
        data, entries = self._load()
        entry = dict(fields)
        entry.setdefault("version", FORMAT_VERSION)
        entry.setdefault("time", utc_now())
        bad = format_problems(entry, signed=False)
        mech = entry.get("mechanism")
        if entry.get("status") == "refused-budget" and isinstance(mech, dict) and mech.get("steps") != 0:
            bad.append("a refused round must record steps 0 (nothing was trained)")
        if entry.get("status") == "refused-budget" and entry.get("update_hash") is not None:
            bad.append("a refused round sends no update: update_hash must be null")
        if entry.get("status") == "discarded" and entry.get("update_hash") is not None:
            bad.append("a discarded round sends no update: update_hash must be null")
        if bad:
            raise LedgerError(f"cannot append to {self.path}: " + "; ".join(bad))
        entry.update(
            index=len(entries), prev_hash=entries[-1]["entry_hash"] if entries else GENESIS_HASH, public_key=key.public_hex
        )
        entry["entry_hash"] = entry_hash(entry)
        entry["signature"] = key.sign(bytes.fromhex(entry["entry_hash"])).hex()
        self._check_extends(entries, [entry], expected_public_key=None)
        self._write(data, entries, entry)
        return entry

    def append_signed(self, entry: Mapping[str, Any], *, expected_public_key: str | None = None) -> dict[str, Any]:
        """Append an entry signed elsewhere (the server's federation copy) after checking it extends the chain.

        Re-sending an entry the copy already holds is a no-op (so a client may re-send entries the
        server missed); a different entry at a position already taken raises LedgerError.
        """
        return self.extend_signed([entry], expected_public_key=expected_public_key)[-1]

    def extend_signed(self, new: list[Mapping[str, Any]], *, expected_public_key: str | None = None) -> list[dict[str, Any]]:
        """Append entries signed elsewhere, in chain order, with one read, one verification and one write.

        The entries may start at any position up to the copy's length (each carries its ``index``): those
        the copy holds must be the very entries it holds (a no-op), the rest must continue its chain. Raises
        LedgerError and records nothing otherwise. Returns the whole chain after the append.
        """
        data, entries = self._load()
        held = len(entries)
        added: list[dict[str, Any]] = []
        for entry in map(dict, new):
            idx = entry.get("index")
            pos = held + len(added)
            if _is_int(idx) and idx < held:
                if entries[idx] == entry:
                    continue
                raise LedgerError(
                    f"{self.path}: a different entry {idx} is already recorded: the client's ledger has "
                    "forked (a rewritten history); nothing was recorded"
                )
            if _is_int(idx) and idx > pos:
                raise LedgerError(
                    f"{self.path} holds entries 0..{pos - 1}, got entry {idx}: the client must send "
                    f"entries {pos}..{idx - 1} first; nothing was recorded"
                )
            if _is_int(idx) and idx < pos:
                raise LedgerError(f"{self.path}: entry {idx} was sent twice; nothing was recorded")
            added.append(entry)
        if not added:
            return entries
        self._check_extends(entries, added, expected_public_key=expected_public_key)
        self._write(data, entries, *added)
        return entries + added

    def _load(self) -> tuple[bytes, list[dict[str, Any]]]:
        """The file's bytes and entries; LedgerError if it cannot be read or does not verify."""
        try:
            stat = _stat_key(self.path)
            if self._verified is not None and self._verified[0] == stat:
                return self._verified[1], list(self._verified[2])
            data = self.path.read_bytes()
        except FileNotFoundError:
            return b"", []
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger {self.path}: {exc}") from exc
        entries, problems = _parse(data, str(self.path))
        integrity = [f.message for f in check_chain(entries) if f.kind in (TAMPERING, CORRUPT)]
        if problems or integrity:
            raise LedgerError(
                f"the ledger {self.path} does not verify, nothing was appended: "
                + "; ".join(problems + integrity)
                + ". Run `fedfuse audit` on it and keep it as evidence"
            )
        if _stat_key(self.path) == stat:  # unchanged while it was read: what was verified is the file
            self._verified = (stat, data, list(entries))
        return data, entries

    def _check_extends(
        self, entries: list[dict[str, Any]], new: list[dict[str, Any]], *, expected_public_key: str | None
    ) -> None:
        """Refuse ``new`` unless it continues ``entries`` (verified by :meth:`_load`: only the new ones are checked)."""
        found = check_chain(entries + new, expected_public_key=expected_public_key, verified=len(entries))
        integrity = [f.message for f in found if f.kind in (TAMPERING, CORRUPT)]
        if integrity:
            raise LedgerError(f"entry does not extend the ledger {self.path}, not recorded: " + "; ".join(integrity))
        for f in found:
            log.warning("%s: %s", self.path, f.message)

    def _write(self, data: bytes, entries: list[dict[str, Any]], *new: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data += b"".join(encode_entry(entry).encode("ascii") + b"\n" for entry in new)
        atomic_write_bytes(self.path, data, sync_dir=self.sync_dir)
        self._verified = (_stat_key(self.path), data, entries + list(new))


def _stat_key(path: Path) -> tuple[int, int, int]:
    """What tells a file's versions apart here: inode (atomic writes replace it), size, modification time."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns
