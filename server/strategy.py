"""FedFuse: Flower's FedAvg, aggregating only the shared blocks, each over the clients that trained it.

- The fusion head always; each modality's encoder too when ``encoders = "federated"``.
- A reply with non-finite values, wrong shapes, unknown keys or an update that does not match its
  ledger entry is rejected (logged with the node and client id); a client that raised is logged;
  the round goes on with the rest.
- A client that is out of budget (or refuses the run's privacy request) is excluded from later
  training rounds; the run goes on.
- The federation's copy of every client's signed privacy ledger is kept in the run folder.
- After each round: a checkpoint and results.json (see ``server/run_folder.py``).
- With ``ema-decay`` > 0 the run evaluates, checkpoints as its served model and reports the moving average
  of the global parameters (``server/ema.py``); clients still train from the global parameters.
- With ``secagg.enabled``, ``server/secagg.py`` runs the rounds through SecAgg+ with these same steps.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import messages as M
from common.config import RunConfig
from common.fileio import fsync_dir
from common.insight.attention import pool as pool_attention
from common.insight.contributions import modality_contributions
from common.model.evaluation import headline
from common.privacy.ledger import Ledger, LedgerError
from server.aggregation import Contribution, weighted_average
from server.ema import ParameterEMA
from server.grid import sample_nodes
from server.metrics import summarize_evaluation
from server.optimizer import ServerOptimizer
from server.replies import ReplyRejected, TrainReply, claimed_client_id, failure_category, parse_evaluate_reply, parse_train_reply
from server.run_folder import LEDGERS, Checkpoint, RunFolder
from server.watch import learning_warnings

log = logging.getLogger("fedfuse.server")

EXCLUDING = (M.STATUS_BUDGET_EXHAUSTED, M.STATUS_POLICY_REFUSED)


@dataclass
class CheckedReply:
    """A train reply after its checks: parsed, with the federation's whole copy of the site's ledger, or rejected
    (``reply`` None, ``rejected`` the client as named and why)."""

    node: int
    reply: TrainReply | None
    ledger: list[dict[str, Any]] = field(default_factory=list)
    rejected: tuple[str, str] | None = None


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
    ema_state: dict[str, torch.Tensor] = field(default_factory=dict)  # ema-decay > 0: the EMA after round_offset


class FedFuse(FedAvg):
    """Per-block FedAvg with reply validation, exclusion of exhausted clients, ledgers and checkpoints."""

    def __init__(
        self,
        config: RunConfig,
        state: RunState,
        optimizer: ServerOptimizer,
        folder: RunFolder,
        federation: dict[str, Any],
        heldout: Callable[[dict[str, torch.Tensor]], dict | None] | None = None,
    ):
        s = config.server
        super().__init__(
            fraction_train=s.fraction_train,
            fraction_evaluate=s.fraction_evaluate,
            min_train_nodes=s.min_clients,
            min_evaluate_nodes=s.min_clients if s.fraction_evaluate else 0,
            min_available_nodes=s.min_clients,
        )
        self.config, self.state, self.optimizer, self.folder = config, state, optimizer, folder
        self.federation = federation
        self.heldout = heldout  # server-side evaluation of the global model (encoders = "federated")
        self.node_clients: dict[int, str] = {}  # Flower node id -> client id (node ids change across runs)
        self.node_names: dict[int, str] = {}  # Flower node id -> name at registration (PollingGrid.names, deployment)
        self.ledger_heads: dict[str, tuple[int, str]] = {}  # client id -> (entries, last entry_hash) of its copy here
        # client id -> its copy here, kept between rounds: a copy unchanged on disk is not read and verified again
        self._ledgers: dict[str, Ledger] = {}
        self._round: dict[str, Any] = {}
        self._checked: dict[str, CheckedReply] = {}  # message id -> the round's train replies checked as they arrived
        self._started = time.perf_counter()
        self._warned = len(learning_warnings(state.rounds, state.total_rounds))  # warnings logged before a resume
        decay = config.server.ema_decay
        self.ema = ParameterEMA(decay, state.ema_state) if decay else None
        self._ema_round = state.round_offset  # the last round folded into the EMA

    def served_state(self, server_round: int) -> dict[str, torch.Tensor]:
        """The model the run evaluates, checkpoints as served and reports: with ``ema-decay`` > 0 the EMA of the
        global parameters (the round's global parameters folded in once, however the round aggregated), else
        the global parameters themselves."""
        if self.ema is None:
            return self.state.global_state
        r = self.absolute(server_round)
        if self._ema_round < r:
            self.state.ema_state = self.ema.update(self.state.global_state)
            self._ema_round = r
        return self.state.ema_state

    def site_name(self, node: int | None, claimed: str | None = None) -> str:
        """A node as the run's log and results show it: its client id (claimed now, or known from an earlier
        reply), else its name at registration, else its node id."""
        if claimed and node is not None:
            self.node_clients.setdefault(node, claimed)
        if claimed:
            return claimed
        if node is None:
            return "a client"
        return self.node_clients.get(node) or self.node_names.get(node) or f"node {node}"

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """Flower's split into valid and error replies, logged by site name (Flower's logs node ids)."""
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        errors = [m for m in replies if m.has_error()]
        if replies:
            log.log(
                logging.INFO if errors else logging.DEBUG,  # the round's line says the rest
                "%s: %d result(s), %d failure(s)%s",
                "train" if is_train else "evaluate",
                len(valid),
                len(errors),
                "".join(f"; {self.site_name(m.metadata.src_node_id)}: {m.error.reason}" for m in errors),
            )
        return valid, errors

    @property
    def round_record(self) -> Mapping[str, Any]:
        """The current round's entry of results.json ``rounds[]`` as built so far (train outcome, evaluation)."""
        return MappingProxyType(self._round)

    def absolute(self, server_round: int) -> int:
        return self.state.round_offset + server_round

    # --- training ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample clients that may still train and send them the global blocks."""
        node_ids = self.train_nodes(server_round, grid)
        arrays = M.pack_arrays(self.state.global_state)
        return [
            message
            for node in node_ids
            for message in self._construct_messages(
                RecordDict({**arrays, M.CONFIG: self.train_request(server_round, node)}), [node], "train"
            )
        ]

    def train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The round's training clients: a sample of those not excluded (this starts the round's record)."""
        self._started = time.perf_counter()
        self._checked.clear()
        # Excluded clients, and those that trained their planned rounds (the noise was calibrated for no more)
        plan = self.config.server.planned_rounds(self.state.total_rounds)
        done = {c for c, rec in self.state.clients.items() if rec.get("rounds_trained", 0) >= plan}
        excluded_nodes = {n for n, c in self.node_clients.items() if c in self.state.excluded}
        finished_nodes = {n for n, c in self.node_clients.items() if c in done}
        # First wait (at most round-timeout) for min-clients sites: a run submitted before its sites connect trains in round 1
        _, connected = sample_nodes(grid, self.min_available_nodes, 0, wait=self.config.server.round_timeout)
        active = [n for n in connected if n not in excluded_nodes]
        want = max(int(len(active) * self.fraction_train), self.min_train_nodes)
        available = [n for n in active if n not in finished_nodes]
        if not available:
            log.warning(
                "round %d: every client is excluded (budgets exhausted) or has trained its planned %d round(s); nothing to train",
                self.absolute(server_round),
                plan,
            )
            return []
        node_ids = random.sample(available, min(want, len(available)))
        self._round = {"round": self.absolute(server_round), "train": {"sampled": len(node_ids)}}
        return node_ids

    def train_request(self, server_round: int, node: int | None = None) -> ConfigRecord:
        """What a train message asks for, besides the global blocks; to a known client, how much of its ledger
        the federation's copy holds (it then sends only the entries after them)."""
        request = {
            M.SERVER_ROUND: self.absolute(server_round),
            M.RUN_ID: self.state.run_id,
            M.PLANNED_ROUNDS: self.config.server.planned_rounds(self.state.total_rounds),
        }
        held = self.ledger_heads.get(self.node_clients.get(node, "")) if node is not None else None
        if held:
            request |= {M.LEDGER_HELD: held[0], M.LEDGER_HEAD: held[1]}
        return ConfigRecord(request)

    def reply_arrived(self, message: Message) -> None:
        """Check a train reply as it arrives (``PollingGrid.on_reply``), while the other sites still train: once the
        last reply is in, the round has only the average left to compute. The same checks as at aggregation."""
        if message.has_error() or message.metadata.message_type != MessageType.TRAIN or not message.metadata.message_id:
            return
        self._checked[message.metadata.message_id] = self._check_train_reply(message)

    def _check_train_reply(self, message: Message) -> CheckedReply:
        parse = functools.partial(
            parse_train_reply, message, global_state=self.state.global_state, encoders=self.config.server.encoders
        )
        return self.check_reply(message.metadata.src_node_id, parse, claimed_client_id(message))

    def _checked_reply(self, message: Message) -> CheckedReply:
        """A train reply's checks: made as it arrived, else now."""
        checked = self._checked.pop(message.metadata.message_id, None)
        return checked if checked is not None else self._check_train_reply(message)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, keep the ledgers, average each block over the clients that sent it."""
        r = self.absolute(server_round)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        checked = [self._checked_reply(m) for m in valid]
        self._checked.clear()
        updates = self.record_replies(r, checked, [(m.metadata.src_node_id, failure_category(m), m.error.reason) for m in errors])
        if not updates:
            log.warning("round %d: no update to aggregate; the global head is unchanged", r)
            return ArrayRecord(self.state.global_state), MetricRecord({"clients-trained": 0})
        averages, _ = weighted_average([Contribution(u.arrays, float(u.num_examples)) for u in updates])
        self.state.global_state = self.optimizer.step(self.state.global_state, averages)
        return ArrayRecord(self.state.global_state), MetricRecord({"clients-trained": len(updates)})

    def check_reply(self, node: int, parse: Callable[[], TrainReply], claimed: str | None) -> CheckedReply:
        """Parse one reply and keep its ledger in the federation's copy; a reply that fails either is rejected."""
        try:
            reply = parse()
            if reply.status == M.STATUS_FAILED:  # the site's ClientApp failed: its category, nothing else
                return CheckedReply(node, reply)
            self.node_clients[node] = reply.client_id
            return CheckedReply(node, reply, self._keep_ledger(reply.client_id, reply.ledger))
        except (ReplyRejected, LedgerError) as exc:
            return CheckedReply(node, None, rejected=(claimed or self.site_name(node), str(exc)))

    def record_replies(
        self, r: int, replies: list[CheckedReply], failures: list[tuple[int | None, str, str]]
    ) -> list[TrainReply]:
        """Record each checked reply's privacy, exclude exhausted clients; return the updates."""
        # failures: (node id or None, category, what Flower said)
        trained, refused, rejected, failed, updates = [], {}, {}, {}, []
        for node, category, reason in failures:
            who = self.site_name(node)
            failed[who] = category
            log.warning("round %d: %s failed (%s): %s", r, who, category, reason)
        for checked in replies:
            node, reply, ledger = checked.node, checked.reply, checked.ledger
            if reply is None:
                who, reason = checked.rejected or (self.site_name(node), "rejected")
                rejected[who] = reason
                log.warning("round %d: rejected the reply of %s (node %d): %s", r, who, node, reason)
                continue
            if reply.status == M.STATUS_FAILED:
                who = self.site_name(node, reply.client_id)
                failed[who] = reply.reason if reply.reason in M.FAILURE_CATEGORIES else M.FAILURE_SITE
                log.warning("round %d: %s failed (%s); the details are in the site's own log", r, who, failed[who])
                continue
            self._record_client(reply, ledger)
            if reply.status != M.STATUS_OK:
                refused[reply.client_id] = reply.status
                if reply.status in EXCLUDING:
                    self.state.excluded.add(reply.client_id)
                    log.warning("round %d: %s excluded from training (%s): %s", r, reply.client_id, reply.status, reply.reason)
                continue
            trained.append(reply.client_id)
            updates.append(reply)
        if self._ledgers:  # the round's appends to the federation's ledgers, durable before anything records the round
            fsync_dir(self.folder.path / LEDGERS)
        self._round.setdefault("round", r)
        self._round["train"] = {
            "sampled": self._round.get("train", {}).get("sampled", 0),
            "trained": sorted(trained),
            "refused": refused,
            "rejected": rejected,
            "failed": dict(sorted(failed.items())),
        }
        self._round["train_seconds"] = round(time.perf_counter() - self._started, 3)
        return updates

    def _keep_ledger(self, client_id: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append the entries the federation's copy lacks; refuse a ledger that rewrites or truncates what it holds.

        ``entries`` is the part of the client's ledger it sent: from the last entry the train request said the
        copy holds, or the whole ledger. Returns the federation's whole copy."""
        ledger = self._ledgers.get(client_id)
        if ledger is None:  # each write fsyncs the file; record_replies fsyncs the folder once a round
            ledger = self._ledgers[client_id] = Ledger(self.folder.ledger_path(client_id), sync_dir=False)
        known = ledger.entries()
        if not entries:  # a client sends at least the last entry the copy holds: none at all is a lost ledger
            if known:
                raise LedgerError(
                    f"{client_id}'s ledger does not extend the federation's copy (truncated or rewritten): "
                    f"it sent no entries, the copy holds {len(known)}"
                )
            return known
        start = entries[0].get("index")
        if not isinstance(start, int) or start < 0 or start > len(known):
            raise LedgerError(
                f"{client_id}'s ledger entries start at {start!r}, but the federation's copy holds "
                f"{len(known)} entries (a gap, or a bad index)"
            )
        sent_to = start + len(entries)
        if sent_to < len(known) or any(a != b for a, b in zip(entries, known[start:])):
            raise LedgerError(f"{client_id}'s ledger does not extend the federation's copy (truncated or rewritten)")
        key = known[0]["public_key"] if known else None
        chain = ledger.extend_signed(entries[len(known) - start :], expected_public_key=key)
        if chain:
            self.ledger_heads[client_id] = (len(chain), chain[-1]["entry_hash"])
        return chain

    def _record_client(self, reply: Any, ledger: list[dict[str, Any]]) -> None:
        rec = self.state.clients.setdefault(reply.client_id, {"rounds_trained": 0})
        rec["modalities"] = list(reply.modalities)
        for key, name in (
            (M.EPSILON, "epsilon"),
            (M.DELTA, "delta"),
            (M.BUDGET, "budget"),
            (M.RUN_EPSILON, "run_epsilon"),
            (M.MAX_EPSILON, "max_epsilon"),
        ):
            if key in reply.metrics:
                rec[name] = float(reply.metrics[key])
        rec.setdefault("delta", self.config.dp.delta)
        if "epsilon_before_run" not in rec and ledger:
            rec["epsilon_before_run"] = spend_before_run(ledger, self.state.run_id)
            cap = rec.get("max_epsilon")
            log.log(
                logging.INFO if rec["epsilon_before_run"] != 0 else logging.DEBUG,  # a fresh site: results.json
                "%s: spent ε = %s before this run (lifetime cap max-epsilon = %s); this run may spend ε = %s "
                "of its own (dp.epsilon)",
                reply.client_id,
                _eps(rec["epsilon_before_run"]),
                _eps(cap),
                _eps(rec.get("budget")),
            )
        if reply.status == M.STATUS_OK:
            rec["rounds_trained"] += 1
            rec["train_examples"] = reply.num_examples  # released for weighting; shown in the run report
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
        record = RecordDict({**M.pack_arrays(self.served_state(server_round)), M.CONFIG: request})
        return self._construct_messages(record, node_ids, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = self.absolute(server_round)
        valid, errors = self._check_and_log_replies(replies, is_train=False, validate=False)
        labels = self.federation.get("labels") or []  # without them, per-class counts cannot be checked: not pooled
        parsed, outcome = [], {"evaluated": [], "refused": {}, "rejected": {}, "failed": {}}
        for msg in errors:
            who = self.site_name(msg.metadata.src_node_id, None)
            outcome["failed"][who] = failure_category(msg)
            log.warning("round %d: %s failed to evaluate (%s): %s", r, who, outcome["failed"][who], msg.error.reason)
        for msg in valid:
            node = msg.metadata.src_node_id
            try:
                reply = parse_evaluate_reply(msg, len(labels) if labels else None)
            except ReplyRejected as exc:
                who = self.site_name(node, claimed_client_id(msg))
                outcome["rejected"][who] = str(exc)
                log.warning("round %d: rejected an evaluation from %s (node %d): %s", r, who, node, exc)
                continue
            who = self.site_name(node, reply.client_id)
            if reply.status == M.STATUS_FAILED:
                outcome["failed"][who] = M.FAILURE_SITE
                log.warning("round %d: %s failed to evaluate (%s); the details are in the site's own log", r, who, M.FAILURE_SITE)
            elif reply.status != M.STATUS_OK:  # e.g. a site refusing the run: nothing of its data is in the results
                outcome["refused"][who] = reply.status
            else:
                outcome["evaluated"].append(who)
                parsed.append(reply)
        summary = summarize_evaluation(parsed, labels)
        if summary is not None and (attention := pool_attention(e.attention for e in parsed if e.num_examples > 0)):
            summary["attention"] = attention  # attention fusion: mean weight per modality and class (common/insight/attention.py)
        self._round["evaluate"] = summary
        self._round["evaluate_replies"] = {
            k: (sorted(v) if isinstance(v, list) else dict(sorted(v.items()))) for k, v in outcome.items()
        }
        if summary is None:
            return None
        figures = {f"client-mean-{k}": v for k, v in summary["client_mean"].items() if isinstance(v, (int, float))}
        if summary["pooled"]:
            figures |= {f"pooled-{k}": v for k, v in summary["pooled"].items() if isinstance(v, (int, float))}
        return MetricRecord(figures)

    # --- end of round --------------------------------------------------------------------------
    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Checkpoint and write results after each completed round (Flower's evaluate_fn hook)."""
        if server_round == 0:
            return None
        r = self.absolute(server_round)
        # The cumulative epsilon of the clients that answered this round's training (the only ones whose spend can
        # have changed): a row grows with the clients trained, not with every client known (privacy.clients has all)
        train = self._round.get("train", {})
        answered = sorted({*train.get("trained", []), *train.get("refused", {})} & self.state.clients.keys())
        self._round["epsilon"] = {cid: self.state.clients[cid].get("epsilon") for cid in answered}
        finite = [e for c in self.state.clients.values() if (e := c.get("epsilon")) is not None]
        self._round["max_epsilon"] = max(finite) if finite else None  # over every client known so far
        self._round.setdefault("evaluate", None)
        served = self.served_state(server_round)
        if self.heldout is not None:
            self._round["server_evaluate"] = self.heldout(served)
        self._add_contributions(r)
        # the round's wall time: from sampling its clients to the end of its evaluations (before its checkpoint)
        self._round["seconds"] = round(time.perf_counter() - self._started, 3)
        self.state.rounds.append(self._round)
        ema = self.state.ema_state if self.ema is not None else {}
        self.folder.save_checkpoint(Checkpoint(r, self.state.global_state, self.optimizer.state(), self.record(), ema))
        self.folder.write_results(self.results(status="running" if r < self.state.total_rounds else "completed"))
        self._log_progress(self._round)
        warnings = learning_warnings(self.state.rounds, self.state.total_rounds)
        for warning in warnings[self._warned :]:
            log.warning("round %d: %s", warning["round"], warning["message"])
        self._warned = len(warnings)
        self._round = {}
        return None

    def _add_contributions(self, r: int) -> None:
        """What each modality contributes to this round's held-out scores (from the evaluation only); warn on collapse."""
        for name in ("evaluate", "server_evaluate"):
            evaluation = self._round.get(name)
            if evaluation:
                found = modality_contributions(
                    evaluation, modalities=self.federation["modalities"], labels=self.federation["labels"]
                )
                evaluation["modality_contributions"] = found
                for warning in found["warnings"]:
                    log.warning("round %d: %s", r, warning)

    def record(self) -> dict[str, Any]:
        return {
            "run_id": self.state.run_id,
            "rounds": self.state.rounds,
            "clients": self.state.clients,
            "excluded": sorted(self.state.excluded),
            "served_model": self.served_model(),
        }

    def served_model(self) -> dict[str, Any]:
        """Which parameters the evaluations, the checkpoint's served model and the results are of."""
        if self.ema is None:
            return {"parameters": "global"}
        return {"parameters": "ema", "ema_decay": self.ema.decay, "clients_train_from": "global"}

    def results(self, status: str) -> dict[str, Any]:
        last = next((r["evaluate"] for r in reversed(self.state.rounds) if r.get("evaluate")), None)
        server_last = next((r["server_evaluate"] for r in reversed(self.state.rounds) if r.get("server_evaluate")), None)
        return {
            "run_id": self.state.run_id,
            "status": status,
            "config": self.config.to_flat(),
            "federation": self.federation,
            "served_model": self.served_model(),  # evaluations are of these parameters
            "rounds": self.state.rounds,
            "final": last,  # the last evaluated round: pooled figures, the clients' mean, each client's own
            "final_server_evaluate": server_last,
            "warnings": self.warnings(),
            "privacy": {"clients": self.state.clients},
        }

    def warnings(self) -> list[dict[str, Any]]:
        """The plan's warning from before the first round (round 0), then the learning warnings."""
        plan = self.federation.get("plan_warning")
        before = [{"round": 0, "kind": "noise", "message": plan}] if plan else []
        return before + learning_warnings(self.state.rounds, self.state.total_rounds)

    def _log_progress(self, rnd: dict[str, Any]) -> None:
        ev, tr = headline(rnd.get("evaluate")), rnd["train"]
        eps = rnd.get("max_epsilon")
        log.info(
            "round %d/%d | trained %d/%d clients | held-out loss %s | accuracy %s | macro-F1 %s | max ε %s | %.1fs",
            rnd["round"],
            self.state.total_rounds,
            len(tr.get("trained", [])),
            tr.get("sampled", 0),
            f"{ev['loss']:.3f}" if ev and ev.get("loss") is not None else "-",
            f"{ev['accuracy']:.3f}" if ev else "-",
            f"{ev['macro_f1']:.3f}" if ev else "-",
            f"{eps:.2f}" if eps is not None and eps != float("inf") else ("∞" if eps else "-"),
            rnd["seconds"],
            extra={"progress": (rnd["round"], self.state.total_rounds)},  # a progress bar's step (fedfuse/progress.py)
        )


def spend_before_run(ledger: list[dict[str, Any]], run_id: str) -> float | None:
    """A client's lifetime epsilon before run ``run_id``, from its ledger (0 if new; None if infinite or unknown)."""
    earlier = [e for e in ledger if isinstance(e, dict) and e.get("run_id") != run_id]
    if not earlier:
        return 0.0
    if any(e.get("private") is False and (e.get("mechanism") or {}).get("steps", 0) > 0 for e in earlier):
        return None  # trained without DP: infinite
    value = earlier[-1].get("epsilon")
    return float(value) if isinstance(value, (int, float)) else None


def _eps(value: float | None) -> str:
    return "∞" if value is None or value == float("inf") else f"{value:.2f}"
