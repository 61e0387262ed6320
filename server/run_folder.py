"""The run output folder: identity, per-round checkpoints, results.json and the federation's ledgers.

Layout::

    <out>/run.json                       run id, creation time, configuration (hash)
    <out>/checkpoints/round-0003.safetensors  global blocks + server optimiser state (+ "ema." EMA) after round 3
    <out>/checkpoints/round-0003.json    round, config hash, round 3's results row, per-client records
    <out>/checkpoints/latest.json        {"round": 3}: the last complete checkpoint
    <out>/results.json                   config, rounds, final, privacy (rewritten after each round)
    <out>/ledgers/<client>.jsonl         the federation's copy of each client's privacy ledger
    <out>/clients/<client>/              simulated clients' private state (simulation only)

Every file is replaced atomically. A checkpoint's JSON is written after its tensors, and
``latest.json`` after both, so a crash mid-write leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError, FedfuseError
from common.fileio import atomic_save_tensors, atomic_write_bytes, atomic_write_json, json_safe, json_text, load_tensors

RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
CHECKPOINTS = "checkpoints"
LEDGERS = "ledgers"
EMA = "ema."  # checkpoint tensor prefix of the EMA of the global blocks


def config_hash(flat_config: dict[str, Any]) -> str:
    """Hash of everything that defines a run's results (the output folder itself excluded)."""
    relevant = {k: (str(v) if isinstance(v, float) else v) for k, v in flat_config.items() if k != "out-dir"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How ``current`` differs from a run's stored configuration, one line per key (empty: the same run).

    A key the stored configuration lacks (added to fedfuse after the run started) counts as the same
    only while it holds its default, so an upgrade does not strand a run folder that can be resumed.
    """
    from common.config import RunConfig

    defaults = json_safe(RunConfig().to_flat())
    stored, current = json_safe(stored), json_safe(current)
    out = []
    for key in sorted((set(stored) | set(current)) - {"out-dir"}):
        if key not in current:
            out.append(f"{key} = {stored[key]!r} in the stored run, unknown now")
        elif key not in stored:
            if current[key] != defaults.get(key):
                out.append(f"{key} = {current[key]!r}, not set when the run started (its default: {defaults.get(key)!r})")
        elif stored[key] != current[key]:
            out.append(f"{key} = {current[key]!r}, the stored run has {stored[key]!r}")
    return out


@dataclass(frozen=True)
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor]
    record: dict[str, Any]  # rounds so far, per-client records, excluded clients
    ema_state: dict[str, torch.Tensor] = field(default_factory=dict)  # ema-decay > 0: the EMA of the global blocks

    @property
    def served_state(self) -> dict[str, torch.Tensor]:
        """The run's served model: the EMA when the run keeps one, else the global blocks."""
        return self.ema_state or self.global_state


class RunFolder:
    """Read and write one run's output folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # results.json's ``rounds`` rows as written so far, each with its JSON text: a row is final once its round
        # ended, so each rewrite serializes only the new rows (see :meth:`write_results`)
        self._rows: list[tuple[dict[str, Any], str]] = []

    # --- identity ------------------------------------------------------------------------------
    def open_run(self, flat_config: dict[str, Any]) -> str:
        """The run id: new for an empty folder, the stored one when continuing the same configuration."""
        self.path.mkdir(parents=True, exist_ok=True)
        run_file = self.path / RUN_FILE
        digest = config_hash(flat_config)
        if run_file.exists():
            doc = json.loads(run_file.read_text())
            if doc.get("config_hash") != digest:
                differences = config_differences(doc.get("config") or {}, flat_config)
                if differences:
                    raise ConfigError(
                        f"{self.path} holds a run with a different configuration ({'; '.join(differences)}); "
                        "resuming it with this one would mix two experiments. Choose another output folder, or "
                        f"resume with the stored configuration (`fedfuse simulate --resume {self.path}`)"
                    )
            return str(doc["run_id"])
        run_id = uuid.uuid4().hex[:12]
        atomic_write_json(
            run_file,
            {
                "run_id": run_id,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "config_hash": digest,
                "config": json_safe(flat_config),
            },
        )
        return run_id

    def stored_config(self) -> dict[str, Any]:
        run_file = self.path / RUN_FILE
        if not run_file.exists():
            raise FedfuseError(f"{self.path} is not a fedfuse run folder (no {RUN_FILE})")
        config = json.loads(run_file.read_text())["config"]
        return {k: (float("inf") if v is None else v) for k, v in config.items()}  # inf was stored as null

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write round r's checkpoint. Its JSON holds round r's row of ``record["rounds"]`` only: the earlier rows are
        in the earlier rounds' checkpoints (rewriting every row each round made them grow with rounds x clients)."""
        folder = self.path / CHECKPOINTS
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"round-{checkpoint.round:04d}"
        tensors = {
            **{f"global.{k}": v for k, v in checkpoint.global_state.items()},
            **{f"{EMA}{k}": v for k, v in checkpoint.ema_state.items()},
            **checkpoint.optimizer_state,
        }
        atomic_save_tensors(folder / f"{stem}.safetensors", tensors, metadata={"round": str(checkpoint.round)})
        record = dict(checkpoint.record) | {"rounds": list(checkpoint.record.get("rounds") or [])[-1:]}
        atomic_write_json(folder / f"{stem}.json", json_safe({"round": checkpoint.round, **record}))
        atomic_write_json(folder / "latest.json", {"round": checkpoint.round})

    def load_checkpoint(self) -> Checkpoint | None:
        folder = self.path / CHECKPOINTS
        latest = folder / "latest.json"
        if not latest.exists():
            return None
        r = int(json.loads(latest.read_text())["round"])
        stem = folder / f"round-{r:04d}"
        record = json.loads(stem.with_suffix(".json").read_text())
        tensors = load_tensors(stem.with_suffix(".safetensors"))
        if record.get("round") != r:
            raise FedfuseError(f"checkpoint {stem} is inconsistent: its record says round {record.get('round')}")
        global_state = {k[len("global.") :]: v for k, v in tensors.items() if k.startswith("global.")}
        ema_state = {k[len(EMA) :]: v for k, v in tensors.items() if k.startswith(EMA)}
        optimizer_state = {k: v for k, v in tensors.items() if not k.startswith(("global.", EMA))}
        record.pop("round")
        record["rounds"] = self._round_rows(r, record.get("rounds") or [])
        return Checkpoint(r, global_state, optimizer_state, record, ema_state)

    def _round_rows(self, r: int, latest: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """results.json's rounds 1..r: each round's row is the last row of its own checkpoint (a checkpoint written
        before rows were kept one per checkpoint holds every row up to its round: its last one is its own)."""
        if len(latest) == r:  # the older layout: every row in the last checkpoint
            return latest
        rows = []
        for i in range(1, r + 1):
            path = self.path / CHECKPOINTS / f"round-{i:04d}.json"
            if not path.exists():
                raise FedfuseError(
                    f"{path} is missing: round {i}'s results are kept in its checkpoint, and resuming needs every round's"
                )
            own = (json.loads(path.read_text()).get("rounds") or [{}])[-1] if i < r else (latest or [{}])[-1]
            if own.get("round") != i:
                raise FedfuseError(f"checkpoint {path} is inconsistent: its last results row is not round {i}'s")
            rows.append(own)
        return rows

    # --- results -------------------------------------------------------------------------------
    def write_results(self, results: dict[str, Any]) -> None:
        """results.json, rewritten whole (atomically) after each round, as :func:`atomic_write_json` writes it.

        Its ``rounds`` rows are serialized once each: the strategy appends a round's row when the round ends
        and never changes it afterwards, so a rewrite serializes the new row and the rest of the file only (the
        rows grow with the clients evaluated: with 100 rounds of 50 evaluated clients, serializing every row at
        every rewrite cost 0.3 s a round). A row that is not the object written before is serialized again."""
        atomic_write_bytes(self.path / RESULTS_FILE, (self._results_text(results) + "\n").encode("utf-8"))

    def _results_text(self, results: dict[str, Any]) -> str:
        rows = results.get("rounds")
        if not isinstance(rows, list):
            return _dumps(results)
        same = 0
        while same < min(len(rows), len(self._rows)) and self._rows[same][0] is rows[same]:
            same += 1
        self._rows[same:] = [(row, textwrap.indent(_dumps(row), "    ")) for row in rows[same:]]
        token = f"fedfuse-rounds-{secrets.token_hex(16)}"  # where the rows go: a string nothing else holds
        body = "[\n" + ",\n".join(text for _, text in self._rows) + "\n  ]" if rows else "[]"
        return _dumps({**results, "rounds": token}).replace(json.dumps(token), body, 1)

    def ledger_path(self, client_id: str) -> Path:
        folder = self.path / LEDGERS
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{_safe_name(client_id)}.jsonl"


def _dumps(value: Any) -> str:
    """``value`` as :func:`atomic_write_json` writes it, NaN and infinities as null."""
    return json_text(json_safe(value))


def _safe_name(client_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in client_id)
    if not safe or safe.startswith("."):
        raise ValueError(f"client id {client_id!r} cannot name a file")
    return safe
