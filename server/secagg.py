"""Secure aggregation of the head with Flower's SecAgg+: the server learns only the sum of the sites' updates.

The rounds run through Flower's legacy stack (``DefaultWorkflow`` + ``SecAggPlusWorkflow`` +
``LegacyContext``, the only way Flower 1.42 offers SecAgg+), with FedFuse's own sampling,
bookkeeping, exclusions, evaluation, checkpoints and results. Per round:

1. FedFuse samples the clients; SecAgg+ sets up keys and secret shares among them (2 message phases).
2. Each client trains and sends, masked, its weighted per-key head changes and per-key weights
   (``client/secagg.py``), and in the clear its identity, privacy metrics and signed ledger.
3. SecAgg+ unmasks the sum (4th phase). :func:`decode_average` turns it into each key's average
   over the clients holding it, weighted by their training-set sizes: the same per-block FedAvg as
   ``server/aggregation.py``, computed from sums alone. The server optimiser then steps as usual.

SecAgg+ quantises each client's weighted vector to integers before masking: values are clipped to
``secagg.clipping-range`` = c and rounded (stochastically, unbiased) to steps of 2c / T, with T the
largest power of two that cannot overflow the 2**32 mask modulus for the round's clients
(:func:`quantization_range`). The decoded average of key k is off by at most about
``N * (2c / T) * (1 + |change|) / sum of n_i / max-weight`` over k's holders (README, Secure aggregation).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from common import messages as M
from common.model.fusion import block_of
from common.model.multimodal import HEAD_PREFIX
from server.replies import ReplyRejected, TrainReply, parse_identity, parse_metrics
from server.strategy import FedFuse

log = logging.getLogger("fedfuse.server")

MODULUS = 2**32  # SecAgg+'s mask modulus (its largest)


class SumRejected(Exception):
    """The unmasked sum cannot be used (non-finite, or inconsistent with what the clients declared)."""


def quantization_range(num_clients: int) -> int:
    """T: the largest power of two <= 2**30 with num_clients * T < 2**32, so the sum of quantised vectors never wraps."""
    return min(2**30, MODULUS >> math.ceil(math.log2(num_clients + 1)))


def holds(key: str, modalities: Sequence[str]) -> bool:
    """Whether a client with ``modalities`` has head key ``key`` (``blocks.<m>.*`` only with m, ``core.*`` always)."""
    modality = block_of(key.removeprefix(HEAD_PREFIX))
    return modality is None or modality in modalities


def expected_weights(layout: Sequence[str], clients: Sequence[tuple[Sequence[str], int]]) -> dict[str, float]:
    """Per key, the share of the total weight held by its holders, from the clients' (modalities, examples)."""
    total = sum(n for _, n in clients)
    return {key: sum(n for mods, n in clients if holds(key, mods)) / total for key in layout}


def sum_tolerance(*, num_clients: int, total_weight: float, clipping_range: float, quantization: int) -> float:
    """How far a decoded weight may be from the declared one: rounding of N clients, in units of the total weight."""
    return 1e-4 + 4 * num_clients * (2 * clipping_range / quantization) / total_weight


def decode_average(
    mean: Sequence[np.ndarray],
    layout: Sequence[str],
    reference: Mapping[str, torch.Tensor],
    expected: Mapping[str, float],
    *,
    tolerance: float,
) -> dict[str, torch.Tensor]:
    """Each held key's weighted average from SecAgg+'s output (the weighted mean of the clients' vectors)."""
    *changes, weights = [np.asarray(a, dtype=np.float64) for a in mean]
    if len(changes) != len(layout) or weights.shape != (len(layout),):
        raise SumRejected(f"the sum has {len(mean)} arrays, expected {len(layout) + 1} for this head")
    if not all(np.isfinite(a).all() for a in changes) or not np.isfinite(weights).all():
        raise SumRejected("the sum holds non-finite values")
    for key, weight in zip(layout, weights):
        if abs(weight - expected[key]) > tolerance:
            raise SumRejected(f"the total weight of '{key}' is {weight:.6g} but the clients declared {expected[key]:.6g}")
    averages = {}
    for key, change, weight in zip(layout, changes, weights):
        if expected[key] > 0:  # someone holds it; (sum of weighted changes) / (sum of weights) = weighted mean change
            ref = reference[key]
            averages[key] = (ref.to(torch.float64) + torch.from_numpy(change).reshape(ref.shape) / weight).to(ref.dtype)
    return averages


def _claimed(fitres: FitRes) -> str | None:
    try:
        value = json.loads(str(fitres.metrics.get(M.CLIENT))).get(M.CLIENT_ID)
    except Exception:  # noqa: BLE001  (a malformed clear part: there is no id to report)
        return None
    return value if isinstance(value, str) and value else None


def parse_clear_reply(fitres: FitRes, node_id: int) -> TrainReply:
    """Validate what a client sent in the clear beside its masked vector: identity, privacy metrics, ledger, weight."""
    metrics = dict(fitres.metrics)
    try:
        identity = json.loads(str(metrics.pop(M.CLIENT)))
        if not isinstance(identity, dict):
            raise ValueError("not a record")
        content = RecordDict({M.METRICS: MetricRecord(metrics), M.CLIENT: ConfigRecord(identity)})
    except Exception as exc:  # noqa: BLE001  (anything unreadable is a rejection, never a crash)
        raise ReplyRejected(f"unreadable clear part of a secure reply: {exc}") from None
    client_id, modalities, status, reason, ledger = parse_identity(content)
    metrics = parse_metrics(content)
    n = metrics[M.NUM_EXAMPLES]
    if status == M.STATUS_OK and n < 1:
        raise ReplyRejected("an update needs num-examples >= 1")
    if fitres.num_examples != (n if status == M.STATUS_OK else 0):
        raise ReplyRejected(f"its SecAgg+ weight {fitres.num_examples} does not match its status '{status}' and num-examples {n}")
    for key in (M.EPSILON, M.BUDGET):
        value = metrics.get(key)
        if value is not None and (not isinstance(value, (int, float)) or math.isnan(value)):
            raise ReplyRejected(f"'{key}' must be a number, got {value!r}")
    return TrainReply(node_id, client_id, modalities, status, reason, {}, metrics, ledger)


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, keeping its state so that a halted round still records what clients said in the clear."""

    state: Any = None

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        self.state = state
        return super().setup_stage(grid, context, state)


class SecureFedFuse(Strategy):
    """FedFuse's rounds with the head aggregated by SecAgg+ (Flower's legacy Strategy interface, for its workflows)."""

    def __init__(self, fed: FedFuse, grid: Grid):
        self.fed, self.grid, self.secagg = fed, grid, fed.config.secagg
        self.layout = sorted(fed.state.global_state)  # the order of the masked vector
        self._nodes: list[int] = []
        self._workflow: _SecAggPlus | None = None
        self._aggregated = False
        self._quantization = 0  # this round's quantisation range T (fit_round)

    def workflow(self) -> DefaultWorkflow:
        return DefaultWorkflow(fit_workflow=self.fit_round, evaluate_workflow=self.evaluate_round)

    # --- one round: DefaultWorkflow's fit and evaluate steps ------------------------------------
    def fit_round(self, grid: Grid, context: Context) -> None:
        """Sample as FedFuse does, then run SecAgg+ (setup, share keys, collect masked vectors, unmask)."""
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        r = self.fed.absolute(server_round)
        self._nodes = self.fed.train_nodes(server_round, grid)
        if len(self._nodes) < 2:
            log.warning(
                "round %d: secure aggregation needs at least 2 clients, %d may train; the head is unchanged", r, len(self._nodes)
            )
            self.fed.record_replies(r, [], [])
            return
        self._aggregated = False
        self._quantization = quantization_range(len(self._nodes))
        self._workflow = _SecAggPlus(
            self.secagg.num_shares,
            self.secagg.reconstruction_threshold,
            max_weight=float(self.secagg.max_weight),
            clipping_range=self.secagg.clipping_range,
            quantization_range=self._quantization,
            modulus_range=MODULUS,
            timeout=self.fed.config.server.round_timeout,
        )
        self._workflow(grid, context)
        if not self._aggregated:  # SecAgg+ halted: too many clients dropped out to unmask
            log.warning("round %d: secure aggregation did not complete; the head is unchanged", r)
            state = self._workflow.state
            self._record(server_round, list(getattr(state, "legacy_results", [])), None)

    def evaluate_round(self, grid: Grid, context: Context) -> None:
        """Clients evaluate the new head (Message API, as in a plain round); then checkpoint and results."""
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        # (FedFuse reads the head from its own state: the ArrayRecord arguments are Flower's interface only)
        messages = list(self.fed.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
        replies = grid.send_and_receive(messages, timeout=self.fed.config.server.round_timeout) if messages else []
        self.fed.aggregate_evaluate(server_round, replies)
        self.fed.end_round(server_round, ArrayRecord())

    # --- Flower's legacy Strategy interface -----------------------------------------------------
    def initialize_parameters(self, client_manager: Any) -> Parameters:
        return ndarrays_to_parameters(self._global_arrays())

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[Any, FitIns]]:
        """The global head (arrays in layout order) and the train request, to the nodes FedFuse sampled."""
        config = {**dict(self.fed.train_request(server_round)), M.LAYOUT: json.dumps(self.layout)}
        fitins = FitIns(ndarrays_to_parameters(self._global_arrays()), config)
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node_id=n, grid=self.grid, run_id=run_id), fitins) for n in self._nodes]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict]:
        """SecAgg+ hands every result the same unmasked mean vector: decode it once; record every clear part."""
        self._aggregated = True
        mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return self._record(server_round, results, mean), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []  # evaluation runs in evaluate_round, through the Message API

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None

    # --- helpers --------------------------------------------------------------------------------
    def _global_arrays(self) -> list[np.ndarray]:
        return [self.fed.state.global_state[k].detach().cpu().numpy() for k in self.layout]

    def _record(self, server_round: int, results: list[tuple[Any, FitRes]], mean: list[np.ndarray] | None) -> Parameters | None:
        """Keep the clear parts (ledgers, privacy, exclusions) and, when the sum is usable, step the head."""
        r = self.fed.absolute(server_round)
        state = self._workflow.state if self._workflow else None
        reasons = sorted({str(getattr(f.args[0], "reason", f)) if f.args else str(f) for f in getattr(state, "failures", [])})
        if reasons:
            log.warning("round %d: secure aggregation: %s", r, "; ".join(reasons))
        answered = {proxy.node_id for proxy, _ in results}
        failures = [(n, M.FAILURE_DROPPED, "dropped out of secure aggregation") for n in self._nodes if n not in answered]
        replies = [
            self.fed.check_reply(proxy.node_id, functools.partial(parse_clear_reply, fitres, proxy.node_id), _claimed(fitres))
            for proxy, fitres in results
        ]
        updates = self.fed.record_replies(r, replies, failures)
        if mean is None or not updates:
            if mean is not None:
                log.warning("round %d: no update to aggregate; the global head is unchanged", r)
            return None
        # SecAgg+ cannot take one client's update out of the sum: every weighted reply must have been accepted
        accepted = {u.node_id for u in updates}
        spoilt = [proxy.node_id for proxy, fitres in results if fitres.num_examples > 0 and proxy.node_id not in accepted]
        if spoilt:
            log.warning(
                "round %d: the secure sum includes updates whose replies were rejected (nodes %s); it cannot be "
                "separated from them, so the head is unchanged",
                r,
                spoilt,
            )
            return None
        total = sum(u.num_examples for u in updates) / self.secagg.max_weight
        tolerance = sum_tolerance(
            num_clients=len(results),
            total_weight=total,
            clipping_range=self.secagg.clipping_range,
            quantization=self._quantization,
        )
        expected = expected_weights(self.layout, [(u.modalities, u.num_examples) for u in updates])
        try:
            averages = decode_average(mean, self.layout, self.fed.state.global_state, expected, tolerance=tolerance)
        except SumRejected as exc:
            log.warning("round %d: the secure sum is rejected (%s); the head is unchanged", r, exc)
            return None
        self.fed.state.global_state = self.fed.optimizer.step(self.fed.state.global_state, averages)
        return ndarrays_to_parameters(self._global_arrays())


def run_secure(fed: FedFuse, grid: Grid, context: Context, *, num_rounds: int) -> None:
    """Run ``num_rounds`` rounds of FedFuse with the head aggregated by SecAgg+."""
    strategy = SecureFedFuse(fed, grid)
    legacy = LegacyContext(context, config=LegacyServerConfig(num_rounds=num_rounds), strategy=strategy)
    strategy.workflow()(grid, legacy)
