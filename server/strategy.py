"""FedFuse: Flower's FedAvg, aggregating only the shared blocks, each over the clients that trained it.

- The fusion head always; each modality's encoder too when ``encoders = "federated"``.
- A reply with non-finite values, wrong shapes, unknown keys or an update that does not match its
  ledger entry is rejected (logged with the node and client id); a client that raised is logged;
  the round goes on with the rest.
- A client that is out of budget (or refuses the run's privacy request) is excluded from later
  training rounds; the run goes on.
- The federation's copy of every client's signed privacy ledger is kept in the run folder.
- After each round: a checkpoint and results.json (see ``server/run_folder.py``).
- With ``secagg.enabled``, ``server/secagg.py`` runs the rounds through SecAgg+ with these same steps.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import messages as M
from common.config import RunConfig
from common.ledger import Ledger, LedgerError
from server.aggregation import Contribution, weighted_average
from server.grid import sample_nodes
from server.optimizer import ServerOptimizer
from server.replies import ReplyRejected, TrainReply, claimed_client_id, mean_metrics, parse_evaluate_reply, parse_train_reply
from server.run_folder import Checkpoint, RunFolder

log = logging.getLogger("fedfuse.server")

EXCLUDING = (M.STATUS_BUDGET_EXHAUSTED, M.STATUS_POLICY_REFUSED)


@dataclass
class RunState:
    """Everything the server carries from round to round (and restores on resume)."""

    run_id: str
    total_rounds: int
    round_offset: int  # rounds completed before this process started (resume)
    global_state: dict[str, torch.Tensor]
    rounds: list[dict[str, Any]] = field(default_factory=list)  # results.json "rounds"
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)  # client id -> privacy record
    excluded: set[str] = field(default_factory=set)  # client ids not asked to train again


class FedFuse(FedAvg):
    """Per-block FedAvg with reply validation, exclusion of exhausted clients, ledgers and checkpoints."""

    def __init__(self, config: RunConfig, state: RunState, optimizer: ServerOptimizer, folder: RunFolder,
                 federation: dict[str, Any], heldout: Callable[[dict[str, torch.Tensor]], dict | None] | None = None):
        s = config.server
        super().__init__(fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
                         min_train_nodes=s.min_clients, min_evaluate_nodes=s.min_clients if s.fraction_evaluate else 0,
                         min_available_nodes=s.min_clients)
        self.config, self.state, self.optimizer, self.folder = config, state, optimizer, folder
        self.federation = federation
        self.heldout = heldout  # server-side evaluation of the global model (encoders = "federated")
        self.node_clients: dict[int, str] = {}  # Flower node id -> client id (node ids change across runs)
        self.node_names: dict[int, str] = {}  # Flower node id -> name at registration (PollingGrid.names, deployment)
        self._round: dict[str, Any] = {}
        self._started = time.perf_counter()

    def site_name(self, node: int | None) -> str:
        """A node as the run's log and results show it: its client id, else its registered name, else its node id."""
        if node is None:
            return "a client"
        return self.node_clients.get(node) or self.node_names.get(node) or f"node {node}"

    def _check_and_log_replies(self, replies: Iterable[Message], is_train: bool, validate: bool = True) -> tuple[list[Message], list[Message]]:
        """Flower's split into valid and error replies, logged by site name (Flower's logs node ids)."""
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        errors = [m for m in replies if m.has_error()]
        if replies:
            log.info("%s: %d result(s), %d failure(s)%s", "train" if is_train else "evaluate", len(valid), len(errors),
                     "".join(f"; {self.site_name(m.metadata.src_node_id)}: {m.error.reason}" for m in errors))
        return valid, errors

    def absolute(self, server_round: int) -> int:
        return self.state.round_offset + server_round

    # --- training ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample clients that may still train and send them the global blocks."""
        node_ids = self.train_nodes(server_round, grid)
        record = RecordDict({**M.pack_arrays(self.state.global_state), M.CONFIG: self.train_request(server_round)})
        return self._construct_messages(record, node_ids, "train")

    def train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The round's training clients: a sample of those not excluded (this starts the round's record)."""
        self._started = time.perf_counter()
        excluded_nodes = {n for n, c in self.node_clients.items() if c in self.state.excluded}
        # First wait (at most round-timeout) for min-clients sites: a run submitted before its sites connect trains in round 1
        _, connected = sample_nodes(grid, self.min_available_nodes, 0, wait=self.config.server.round_timeout)
        available = [n for n in connected if n not in excluded_nodes]
        want = max(int(len(available) * self.fraction_train), self.min_train_nodes)
        if not available:
            log.warning("round %d: every client is excluded (budgets exhausted); nothing to train", self.absolute(server_round))
            return []
        node_ids = random.sample(available, min(want, len(available)))
        self._round = {"round": self.absolute(server_round), "train": {"sampled": len(node_ids)}}
        return node_ids

    def train_request(self, server_round: int) -> ConfigRecord:
        """What a train message asks for, besides the global blocks."""
        return ConfigRecord({M.SERVER_ROUND: self.absolute(server_round), M.RUN_ID: self.state.run_id,
                             M.PLANNED_ROUNDS: self.state.total_rounds})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, keep the ledgers, average each block over the clients that sent it."""
        r = self.absolute(server_round)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        parse = functools.partial(parse_train_reply, global_state=self.state.global_state, encoders=self.config.server.encoders)
        updates = self.record_replies(r, [(m.metadata.src_node_id, functools.partial(parse, m), claimed_client_id(m)) for m in valid],
                                      [(m.metadata.src_node_id, m.error.reason) for m in errors])
        if not updates:
            log.warning("round %d: no update to aggregate; the global head is unchanged", r)
            return ArrayRecord(self.state.global_state), MetricRecord({"clients-trained": 0})
        averages, _ = weighted_average([Contribution(u.arrays, float(u.num_examples)) for u in updates])
        self.state.global_state = self.optimizer.step(self.state.global_state, averages)
        return ArrayRecord(self.state.global_state), MetricRecord({"clients-trained": len(updates)})

    def record_replies(self, r: int, replies: list[tuple[int, Callable[[], TrainReply], str | None]],
                       failures: list[tuple[int | None, str]]) -> list[TrainReply]:
        """Parse each reply, keep its ledger and privacy record, exclude exhausted clients; return the updates."""
        # replies: (node id, parse, claimed client id); failures: (node id or None, reason)
        trained, refused, rejected, failed, updates = [], {}, {}, [], []
        for node, reason in failures:
            who = self.site_name(node)
            failed.append(who)
            log.warning("round %d: %s failed: %s", r, who, reason)
        for node, parse, claimed in replies:
            try:
                reply = parse()
                self.node_clients[node] = reply.client_id
                self._keep_ledger(reply.client_id, reply.ledger)
            except (ReplyRejected, LedgerError) as exc:
                who = claimed or self.site_name(node)
                rejected[who] = str(exc)
                log.warning("round %d: rejected the reply of %s (node %d): %s", r, who, node, exc)
                continue
            self._record_client(reply)
            if reply.status != M.STATUS_OK:
                refused[reply.client_id] = reply.status
                if reply.status in EXCLUDING:
                    self.state.excluded.add(reply.client_id)
                    log.warning("round %d: %s excluded from training (%s): %s", r, reply.client_id, reply.status, reply.reason)
                continue
            trained.append(reply.client_id)
            updates.append(reply)
        self._round.setdefault("round", r)
        self._round["train"] = {"sampled": self._round.get("train", {}).get("sampled", 0), "trained": sorted(trained),
                                "refused": refused, "rejected": rejected, "failed": sorted(failed)}
        self._round["train_seconds"] = round(time.perf_counter() - self._started, 3)
        return updates

    def _keep_ledger(self, client_id: str, entries: list[dict[str, Any]]) -> None:
        """Append the entries the federation's copy lacks; refuse a ledger that rewrites what it holds."""
        ledger = Ledger(self.folder.ledger_path(client_id))
        known = ledger.entries()
        if len(entries) < len(known) or any(a.get("entry_hash") != b["entry_hash"] for a, b in zip(entries, known)):
            raise LedgerError(f"{client_id}'s ledger does not extend the federation's copy (truncated or rewritten)")
        key = known[0]["public_key"] if known else None
        for entry in entries[len(known):]:
            ledger.append_signed(entry, expected_public_key=key)

    def _record_client(self, reply: Any) -> None:
        rec = self.state.clients.setdefault(reply.client_id, {"rounds_trained": 0})
        rec["modalities"] = list(reply.modalities)
        for key, name in ((M.EPSILON, "epsilon"), (M.DELTA, "delta"), (M.BUDGET, "budget")):
            if key in reply.metrics:
                rec[name] = float(reply.metrics[key])
        rec.setdefault("delta", self.config.dp.delta)
        if reply.status == M.STATUS_OK:
            rec["rounds_trained"] += 1
        rec["status"] = "excluded: " + reply.status if reply.status in EXCLUDING else "active"

    # --- evaluation ----------------------------------------------------------------------------
    def evaluates(self, server_round: int) -> bool:
        """Whether clients evaluate after this round: every ``evaluate-every``-th round, and always the last."""
        r = self.absolute(server_round)
        return r % self.config.server.evaluate_every == 0 or r >= self.state.total_rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0 or not self.evaluates(server_round):
            return []
        num = max(int(len(list(grid.get_node_ids())) * self.fraction_evaluate), self.min_evaluate_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, num, wait=self.config.server.round_timeout)
        request = ConfigRecord({M.SERVER_ROUND: self.absolute(server_round), M.RUN_ID: self.state.run_id})
        record = RecordDict({**M.pack_arrays(self.state.global_state), M.CONFIG: request})
        return self._construct_messages(record, node_ids, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid, _ = self._check_and_log_replies(replies, is_train=False, validate=False)
        parsed = []
        for msg in valid:
            try:
                parsed.append(parse_evaluate_reply(msg))
            except ReplyRejected as exc:
                log.warning("round %d: rejected an evaluation from %s: %s", self.absolute(server_round), self.site_name(msg.metadata.src_node_id), exc)
        summary = mean_metrics(parsed)
        self._round["evaluate"] = summary
        if summary is None:
            return None
        return MetricRecord({k: v for k, v in summary.items() if isinstance(v, (int, float))})

    # --- end of round --------------------------------------------------------------------------
    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Checkpoint and write results after each completed round (Flower's evaluate_fn hook)."""
        if server_round == 0:
            return None
        r = self.absolute(server_round)
        spend = {cid: c.get("epsilon") for cid, c in sorted(self.state.clients.items())}
        finite = [e for e in spend.values() if e is not None]
        self._round["epsilon"] = spend  # every known client's cumulative epsilon after this round
        self._round["max_epsilon"] = max(finite) if finite else None
        self._round["seconds"] = round(time.perf_counter() - self._started, 3)
        self._round.setdefault("evaluate", None)
        if self.heldout is not None:
            self._round["server_evaluate"] = self.heldout(self.state.global_state)
        self.state.rounds.append(self._round)
        self.folder.save_checkpoint(Checkpoint(r, self.state.global_state, self.optimizer.state(), self.record()))
        self.folder.write_results(self.results(status="running" if r < self.state.total_rounds else "completed"))
        self._log_progress(self._round)
        self._round = {}
        return None

    def record(self) -> dict[str, Any]:
        return {"run_id": self.state.run_id, "rounds": self.state.rounds, "clients": self.state.clients,
                "excluded": sorted(self.state.excluded)}

    def results(self, status: str) -> dict[str, Any]:
        last = next((r["evaluate"] for r in reversed(self.state.rounds) if r.get("evaluate")), None)
        server_last = next((r["server_evaluate"] for r in reversed(self.state.rounds) if r.get("server_evaluate")), None)
        return {
            "run_id": self.state.run_id,
            "status": status,
            "config": self.config.to_flat(),
            "federation": self.federation,
            "rounds": self.state.rounds,
            "final": last,
            "final_server_evaluate": server_last,
            "privacy": {"clients": self.state.clients},
        }

    def _log_progress(self, rnd: dict[str, Any]) -> None:
        ev, tr = rnd.get("evaluate") or {}, rnd["train"]
        eps = rnd.get("max_epsilon")
        log.info(
            "round %d/%d | trained %d/%d clients | loss %s | accuracy %s | max ε %s | %.1fs",
            rnd["round"], self.state.total_rounds, len(tr.get("trained", [])), tr.get("sampled", 0),
            f"{ev['loss']:.3f}" if ev else "-", f"{ev['accuracy']:.3f}" if ev else "-",
            f"{eps:.2f}" if eps is not None and eps != float("inf") else ("∞" if eps else "-"), rnd["seconds"],
        )
