"""Checking what clients send: a reply the server cannot trust is rejected, with the reason, never averaged."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode

from common import messages as M
from common.insight.attention import parse_key as attention_key
from common.messages import update_digest
from common.model.multimodal import ENCODER_PREFIX, HEAD_PREFIX
from common.privacy.ledger import LedgerError, decode_entry
from common.provenance import UNTRUSTED_APP_MARK


class ReplyRejected(Exception):
    """A reply is malformed or unsafe to aggregate; the round goes on without it."""


@dataclass(frozen=True, eq=False)
class TrainReply:
    node_id: int
    client_id: str
    modalities: tuple[str, ...]
    status: str
    reason: str
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    ledger: list[dict[str, Any]]  # the client's whole ledger (empty if it sent none)

    @property
    def num_examples(self) -> int:
        return int(self.metrics.get(M.NUM_EXAMPLES, 0))


@dataclass(frozen=True, eq=False)
class EvaluateReply:
    node_id: int
    client_id: str
    num_examples: int
    overall: dict[str, float] = field(default_factory=dict)  # accuracy, macro-f1, loss
    by_modalities: dict[str, dict[str, float]] = field(default_factory=dict)  # subset -> metric -> value
    confusion: list[list[int]] | None = None  # true class x predicted class (None: not sent)
    class_counts: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # subset -> support/predicted/correct
    attention: dict[str, float] = field(default_factory=dict)  # "attention.*" sums and counts (common/insight/attention.py)
    status: str = M.STATUS_OK  # not ok: the client refused (or failed) this evaluation and reported nothing


def failure_category(message: Message) -> str:
    """The category results.json records for a message that came back as an error (Flower's or fedfuse's own)."""
    if message.has_error():
        code = message.error.code
        if code in (ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE):
            return M.FAILURE_NO_REPLY
        if UNTRUSTED_APP_MARK in message.error.reason:
            return M.FAILURE_APP_REFUSED
        if code in (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.CLIENT_APP_CRASHED):
            return M.FAILURE_SITE
        return M.FAILURE_APP
    return M.FAILURE_SITE


def claimed_client_id(message: Message) -> str | None:
    """The client id a reply claims, if it has a readable one (to name the client in a rejection)."""
    try:
        value = message.content.config_records[M.CLIENT].get(M.CLIENT_ID)
    except Exception:  # noqa: BLE001  (a malformed reply: there is no id to report)
        return None
    return value if isinstance(value, str) and value else None


def parse_identity(content: RecordDict) -> tuple[str, tuple[str, ...], str, str, list[dict[str, Any]]]:
    """A reply's client record: (client id, modalities, status, reason, ledger entries)."""
    if M.CLIENT not in content.config_records:
        raise ReplyRejected(f"no '{M.CLIENT}' record")
    ident = content.config_records[M.CLIENT]
    client_id, modalities = ident.get(M.CLIENT_ID), ident.get(M.MODALITIES)
    status = ident.get(M.STATUS, M.STATUS_OK)
    if status not in M.STATUSES:
        raise ReplyRejected(f"unknown status '{status}'")
    if not isinstance(client_id, str) or not (client_id or status == M.STATUS_FAILED):  # a failed site may not know it
        raise ReplyRejected("missing client id")
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise ReplyRejected("modalities must be a list of names")
    raw = ident.get(M.LEDGER, [])
    if not isinstance(raw, list):
        raise ReplyRejected("the ledger must be a list of entries")
    try:
        ledger = [decode_entry(e) for e in raw]
    except LedgerError as exc:
        raise ReplyRejected(f"unreadable ledger entry: {exc}") from None
    return client_id, tuple(modalities), status, str(ident.get(M.REASON, "")), ledger


def parse_metrics(content: RecordDict) -> dict[str, Any]:
    """A reply's metrics, with a valid num-examples."""
    if M.METRICS not in content.metric_records:
        raise ReplyRejected(f"no '{M.METRICS}' record")
    metrics = dict(content.metric_records[M.METRICS])
    n = metrics.get(M.NUM_EXAMPLES)
    if not isinstance(n, int) or n < 0:
        raise ReplyRejected(f"'{M.NUM_EXAMPLES}' must be a non-negative integer, got {n!r}")
    return metrics


def parse_train_reply(message: Message, *, global_state: dict[str, torch.Tensor], encoders: str) -> TrainReply:
    """Validate a train reply against the global state: known keys, right shapes, finite values."""
    client_id, modalities, status, reason, ledger = parse_identity(message.content)
    metrics = parse_metrics(message.content)
    arrays: dict[str, torch.Tensor] = {}
    if status == M.STATUS_OK:
        if M.ARRAYS not in message.content.array_records:
            raise ReplyRejected("status ok but no arrays")
        try:
            arrays = M.unpack_arrays(message.content)
        except ValueError as exc:
            raise ReplyRejected(f"malformed update: {exc}") from None
        if not arrays:
            raise ReplyRejected("empty update")
        if metrics[M.NUM_EXAMPLES] < 1:
            raise ReplyRejected("an update needs num-examples >= 1")
        for key, value in arrays.items():
            if key.startswith(HEAD_PREFIX):
                if key not in global_state:
                    raise ReplyRejected(f"unknown key '{key}'")
            elif key.startswith(ENCODER_PREFIX) and encoders == "federated":
                modality = key[len(ENCODER_PREFIX) :].split(".")[0]
                if modality not in modalities:
                    raise ReplyRejected(f"encoder '{modality}' sent by a client that does not hold it")
            else:
                raise ReplyRejected(
                    f"unknown key '{key}'" + (" (encoders are local in this run)" if key.startswith(ENCODER_PREFIX) else "")
                )
            if key in global_state and tuple(value.shape) != tuple(global_state[key].shape):
                raise ReplyRejected(f"'{key}' has shape {tuple(value.shape)}, expected {tuple(global_state[key].shape)}")
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise ReplyRejected(f"'{key}' holds non-finite values")
    for key in (M.EPSILON, M.BUDGET):
        value = metrics.get(key)
        if value is not None and (not isinstance(value, (int, float)) or math.isnan(value)):
            raise ReplyRejected(f"'{key}' must be a number, got {value!r}")
    if status == M.STATUS_OK and ledger and ledger[-1].get("update_hash") != update_digest(arrays):
        raise ReplyRejected("the update does not match the hash in the client's latest ledger entry")
    return TrainReply(message.metadata.src_node_id, client_id, modalities, status, reason, arrays, metrics, ledger)


def parse_evaluate_reply(message: Message, num_classes: int | None = None) -> EvaluateReply:
    """Split an evaluate reply's flat metrics into overall and per-modality-subset values.

    Per-class counts (``confusion``, ``by.<subset>.support`` ...) must hold ``num_classes`` (squared)
    non-negative integers that agree with the reply's example counts; without ``num_classes`` they are dropped.
    """
    client_id, _, status, _, _ = parse_identity(message.content)
    metrics = parse_metrics(message.content)
    if status != M.STATUS_OK:  # a refusal (or a failure) carries no evaluation, and none may be taken from it
        if set(metrics) != {M.NUM_EXAMPLES} or metrics[M.NUM_EXAMPLES] != 0:
            raise ReplyRejected(f"a '{status}' evaluate reply must carry no metrics")
        return EvaluateReply(message.metadata.src_node_id, client_id, 0, status=status)
    n = metrics[M.NUM_EXAMPLES]
    overall: dict[str, float] = {}
    by: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, list[int]]] = {}
    confusion: list[list[int]] | None = None
    attention: dict[str, float] = {}
    for key, value in metrics.items():
        if key == M.NUM_EXAMPLES:
            continue
        subset, _, name = key[len(M.BY_PREFIX) :].rpartition(".") if key.startswith(M.BY_PREFIX) else ("", "", key)
        if (name in M.CLASS_COUNTS and subset) or key == M.CONFUSION:
            size = None if num_classes is None else (num_classes**2 if key == M.CONFUSION else num_classes)
            values = _counts(key, value, size)
            if size is None:
                continue
            if key == M.CONFUSION:
                confusion = [values[i * num_classes : (i + 1) * num_classes] for i in range(num_classes)]
            else:
                counts.setdefault(subset, {})[name] = values
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ReplyRejected(f"metric '{key}' is not a finite number")
        if subset:
            by.setdefault(subset, {})[name] = value
        elif key in (M.ACCURACY, M.MACRO_F1, M.LOSS):
            overall[key] = value
        elif key.startswith(M.ATTENTION_PREFIX):
            try:
                attention_key(key)
            except ValueError as exc:
                raise ReplyRejected(str(exc)) from None
            attention[key] = value
        else:
            raise ReplyRejected(f"unknown metric '{key}'")
    if confusion is not None and sum(map(sum, confusion)) != n:
        raise ReplyRejected(f"the confusion matrix counts {sum(map(sum, confusion))} examples, the reply {n}")
    for subset, c in counts.items():
        if set(c) != set(M.CLASS_COUNTS) or subset not in by:
            raise ReplyRejected(f"per-class counts of '{subset}' must come with its scores and hold {list(M.CLASS_COUNTS)}")
        if (
            sum(c[M.SUPPORT]) != by[subset].get(M.NUM_EXAMPLES)
            or sum(c[M.PREDICTED]) != sum(c[M.SUPPORT])
            or any(k > min(s, p) for s, p, k in zip(c[M.SUPPORT], c[M.PREDICTED], c[M.CORRECT]))
        ):
            raise ReplyRejected(f"the per-class counts of '{subset}' are inconsistent")
    return EvaluateReply(message.metadata.src_node_id, client_id, n, overall, by, confusion, counts, attention=attention)


def _counts(key: str, value: Any, size: int | None) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ReplyRejected(f"metric '{key}' must be a list of non-negative integers")
    if size is not None and len(value) != size:
        raise ReplyRejected(f"metric '{key}' holds {len(value)} counts, expected {size}")
    return list(value)


def mean_metrics(replies: list[EvaluateReply]) -> dict[str, Any] | None:
    """Example-weighted means, overall and per modality subset (each subset weighted by its own counts)."""
    scored = [r for r in replies if r.status == M.STATUS_OK and r.num_examples > 0 and r.overall]
    if not scored:
        return None
    total = sum(r.num_examples for r in scored)
    out: dict[str, Any] = {
        name.replace("-", "_"): sum(r.overall[name] * r.num_examples for r in scored) / total
        for name in (M.ACCURACY, M.MACRO_F1, M.LOSS)
    }
    out["num_examples"] = total
    by: dict[str, dict[str, Any]] = {}
    subsets = sorted({s for r in scored for s in r.by_modalities}, key=lambda s: (s.count("+"), s))
    for subset in subsets:
        parts = [r.by_modalities[subset] for r in scored if subset in r.by_modalities]
        n = sum(int(p[M.NUM_EXAMPLES]) for p in parts)
        by[subset] = {
            "accuracy": sum(p[M.ACCURACY] * p[M.NUM_EXAMPLES] for p in parts) / n,
            "macro_f1": sum(p[M.MACRO_F1] * p[M.NUM_EXAMPLES] for p in parts) / n,
            "num_examples": n,
        }
    out["by_modalities"] = by
    # What each client reported, so that comparisons can be made on the same clients.
    out["clients"] = {
        r.client_id: {
            "accuracy": r.overall[M.ACCURACY],
            "macro_f1": r.overall[M.MACRO_F1],
            "num_examples": r.num_examples,
            "by_modalities": {
                s: {"accuracy": m[M.ACCURACY], "macro_f1": m[M.MACRO_F1], "num_examples": int(m[M.NUM_EXAMPLES])}
                for s, m in r.by_modalities.items()
            },
        }
        for r in scored
    }
    return out
