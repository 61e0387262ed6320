"""The message schema between the ServerApp and the ClientApps: record and metric names in one place.

Train request   {"arrays": global shared blocks, "config": {SERVER_ROUND, RUN_ID, PLANNED_ROUNDS}}
Train reply     {"arrays": the client's head blocks (+ its encoders when encoders = "federated"),
                 "metrics": {NUM_EXAMPLES, EPSILON, ...}, "client": {CLIENT_ID, MODALITIES, STATUS, LEDGER, ...}}
                 A reply whose STATUS is not "ok" carries no arrays.
Secure train    (secagg.enabled: Flower's SecAgg+, legacy FitIns / FitRes records, see server/secagg.py)
                FitIns: the global head as arrays in LAYOUT order, config {SERVER_ROUND, RUN_ID,
                PLANNED_ROUNDS, LAYOUT}. FitRes: the masked vector (client/secagg.py), num_examples (the
                SecAgg+ weight: 0 when the client did not train), metrics = the reply's metrics + CLIENT
                (the client record as a JSON string), in the clear.
Evaluate reply  {"metrics": {NUM_EXAMPLES, ACCURACY, MACRO_F1, LOSS, "by.<subset>.<metric>"},
                 "client": {CLIENT_ID, MODALITIES}}
"""

from __future__ import annotations

import hashlib

import torch

# Record names
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"

# Request config
SERVER_ROUND = "server-round"
RUN_ID = "run-id"
PLANNED_ROUNDS = "planned-rounds"

# Secure aggregation
LAYOUT = "layout"  # FitIns config: JSON list of the global head's keys, in the order of the masked vector

# Client identity and status
CLIENT_ID = "client-id"
MODALITIES = "modalities"
STATUS = "status"
REASON = "reason"
LEDGER = "ledger"  # the client's whole signed ledger, one JSON string per entry

STATUS_OK = "ok"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"  # the round would exceed the client's budget: nothing trained
STATUS_POLICY_REFUSED = "policy-refused"  # the run asks for more privacy loss than the site allows
STATUS_ALREADY_TRAINED = "already-trained"  # this round was trained before a crash and its update is lost
STATUSES = (STATUS_OK, STATUS_BUDGET_EXHAUSTED, STATUS_POLICY_REFUSED, STATUS_ALREADY_TRAINED)

# Metrics (train)
NUM_EXAMPLES = "num-examples"  # size of the client's training (or test) set: released for weighting
EPSILON = "epsilon"  # cumulative epsilon after this round (from public parameters only)
DELTA = "delta"
BUDGET = "budget"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
TRAIN_LOSS = "train-loss"  # computed on private data WITHOUT DP: sent only if release.train-metrics

# Metrics (evaluate), computed on the client's held-out data WITHOUT DP (release.eval-metrics)
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"
LOSS = "loss"
BY_PREFIX = "by."  # "by.image+signal.accuracy", "by.image+signal.num-examples", ...


def update_digest(arrays: dict[str, torch.Tensor]) -> str:
    """sha256 over the update as sent (sorted keys, dtype, shape, bytes): what the ledger records."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        t = arrays[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
