"""The message schema between the ServerApp and the ClientApps: record and metric names in one place.

Parameters travel packed (:func:`pack_arrays`): "arrays" holds ONE flat float32 array and "packing" the
names and shapes it holds (in a deployment every array is its own HTTPS request, twice each way).

Train request   {"arrays"+"packing": global shared blocks, "config": {SERVER_ROUND, RUN_ID, PLANNED_ROUNDS,
                 LEDGER_HELD, LEDGER_HEAD (how much of this client's ledger the federation's copy holds)}}
Train reply     {"arrays"+"packing": the client's head blocks (+ its encoders when encoders = "federated"),
                 "metrics": {NUM_EXAMPLES, EPSILON, ...}, "client": {CLIENT_ID, MODALITIES, STATUS, LEDGER, ...}}
                 LEDGER: the entries the federation's copy lacks (from LEDGER_HELD on when its entry
                 LEDGER_HELD - 1 has hash LEDGER_HEAD, else the whole ledger); each entry carries its index.
                 A reply whose STATUS is not "ok" carries no arrays.
Secure train    (secagg.enabled: Flower's SecAgg+, legacy FitIns / FitRes records, see server/secagg.py)
                FitIns: the global head as arrays in LAYOUT order, config {SERVER_ROUND, RUN_ID,
                PLANNED_ROUNDS, LAYOUT}. FitRes: the masked vector (client/secagg.py), num_examples (the
                SecAgg+ weight: 0 when the client did not train), metrics = the reply's metrics + CLIENT
                (the client record as a JSON string), in the clear.
Evaluate reply  {"metrics": {NUM_EXAMPLES, ACCURACY, MACRO_F1, LOSS, CONFUSION (K x K ints, row-major),
                 "by.<subset>.<metric>" (ACCURACY, MACRO_F1, NUM_EXAMPLES; SUPPORT, PREDICTED, CORRECT: K ints each),
                 "attention.<modality>.<class>.<weight-sum|count>" (attention fusion only)},
                 "client": {CLIENT_ID, MODALITIES, STATUS, REASON}}
                 A reply whose STATUS is not "ok" (policy-refused, failed) carries NUM_EXAMPLES = 0 only.
Failure reply   (train or evaluate, any stage) {"metrics": {NUM_EXAMPLES: 0}, "client": {CLIENT_ID (when the site
                 knows it), MODALITIES: [], STATUS: "failed", REASON: FAILURE_SITE}}: what went wrong stays in
                 the site's log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

# Record names
ARRAYS = "arrays"
PACKING = "packing"  # beside ARRAYS: {"keys": [...], "shapes": [ndim, *shape, ndim, *shape, ...]}
PACKED = "packed"  # the one array in ARRAYS
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"

# Request config
SERVER_ROUND = "server-round"
RUN_ID = "run-id"
PLANNED_ROUNDS = "planned-rounds"
LEDGER_HELD = "ledger-held"  # entries of the client's ledger in the federation's copy (absent: none known)
LEDGER_HEAD = "ledger-head"  # entry_hash of the last of them

# Secure aggregation
LAYOUT = "layout"  # FitIns config: JSON list of the global head's keys, in the order of the masked vector

# Client identity and status
CLIENT_ID = "client-id"
MODALITIES = "modalities"
STATUS = "status"
REASON = "reason"
LEDGER = "ledger"  # the signed ledger entries the server lacks, one JSON string per entry, in chain order

STATUS_OK = "ok"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"  # the round would exceed the client's budget: nothing trained
STATUS_POLICY_REFUSED = "policy-refused"  # the run asks for more privacy loss than the site allows
STATUS_ALREADY_TRAINED = "already-trained"  # this round was trained before a crash and its update is lost
STATUS_DISCARDED = "discarded"  # training failed (non-finite noised parameters): charged to the budget, nothing sent
STATUS_FAILED = "failed"  # the site's ClientApp failed: REASON is FAILURE_SITE only, the details stay in the site's log
STATUSES = (STATUS_OK, STATUS_BUDGET_EXHAUSTED, STATUS_POLICY_REFUSED, STATUS_ALREADY_TRAINED, STATUS_DISCARDED, STATUS_FAILED)

# Failure categories: all the server learns, and results.json records, about a site that failed a message
FAILURE_SITE = "site-error"  # the site's ClientApp failed (one category for every cause: nothing about records leaks)
FAILURE_NO_REPLY = "no-reply"  # no reply within round-timeout, or the site went offline
FAILURE_APP_REFUSED = "app-refused"  # the site refuses to run the run's app: its code is not the one the site reviewed
FAILURE_APP = "app-error"  # Flower could not load or run the ClientApp at the site
FAILURE_DROPPED = "dropped-out"  # left a secure-aggregation round before sending its masked vector
FAILURE_CATEGORIES = (FAILURE_SITE, FAILURE_NO_REPLY, FAILURE_APP_REFUSED, FAILURE_APP, FAILURE_DROPPED)

# Metrics (train)
NUM_EXAMPLES = "num-examples"  # train: the declared (public) training-set size, the aggregation weight; evaluate: test-set size
EPSILON = "epsilon"  # lifetime epsilon after this round, the client's whole history (from public parameters only)
DELTA = "delta"
BUDGET = "budget"  # the run's allowance: dp.epsilon (simulation: the scenario's budget for the client)
RUN_EPSILON = "run-epsilon"  # epsilon of this run's own mechanisms at the client, composed over the run
MAX_EPSILON = "max-epsilon"  # the site's lifetime cap (inf: none); EPSILON is the lifetime figure it caps
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
TRAIN_LOSS = "train-loss"  # computed on private data WITHOUT DP: sent only if release.train-metrics

# Metrics (evaluate), computed on the client's held-out data WITHOUT DP (release.eval-metrics)
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"
LOSS = "loss"
BY_PREFIX = "by."  # "by.image+signal.accuracy", "by.image+signal.num-examples", ...
CONFUSION = "confusion"  # per-class counts: true class x predicted class, flattened row-major (K * K ints)
SUPPORT, PREDICTED, CORRECT = "support", "predicted", "correct"  # per subset, per class: true examples, predictions, hits
CLASS_COUNTS = (SUPPORT, PREDICTED, CORRECT)
# Attention fusion only: summed pooling weight and sample count per modality and true class
# (samples with >= 2 modalities present), "attention.image.3.weight-sum", "attention.image.3.count"
ATTENTION_PREFIX = "attention."
ATTENTION_SUM = "weight-sum"
ATTENTION_COUNT = "count"


def update_digest(arrays: dict[str, torch.Tensor]) -> str:
    """sha256 over the update as sent (sorted keys, dtype, shape, bytes): what the ledger records."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        t = arrays[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def pack_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, ArrayRecord | ConfigRecord]:
    """``{ARRAYS: one flat array, PACKING: names and shapes}``, to put in a RecordDict."""
    keys = list(state)
    if not keys:
        raise ValueError("nothing to pack")
    shapes: list[int] = []
    for key in keys:
        if state[key].dtype != torch.float32:
            raise TypeError(f"'{key}' is {state[key].dtype}; parameters travel as float32")
        shapes += [state[key].dim(), *state[key].shape]
    flat = torch.cat([state[key].detach().reshape(-1) for key in keys])
    return {ARRAYS: ArrayRecord({PACKED: flat}), PACKING: ConfigRecord({"keys": keys, "shapes": shapes})}


def unpack_arrays(content: RecordDict) -> dict[str, torch.Tensor]:
    """The parameters a message carries (empty if none); ValueError when the packing does not fit the array."""
    if ARRAYS not in content.array_records:
        return {}
    if PACKING not in content.config_records:
        raise ValueError(f"'{ARRAYS}' without its '{PACKING}' record")
    arrays = content.array_records[ARRAYS]
    packing = content.config_records[PACKING]
    keys, shapes = packing.get("keys"), packing.get("shapes")
    if list(arrays) != [PACKED] or not isinstance(keys, list) or not isinstance(shapes, list):
        raise ValueError(f"'{ARRAYS}' must hold one '{PACKED}' array described by keys and shapes")
    flat = arrays.to_torch_state_dict()[PACKED]
    if flat.dtype != torch.float32 or flat.dim() != 1:
        raise ValueError(f"the packed array must be a flat float32 vector, got {flat.dtype} {tuple(flat.shape)}")
    out: dict[str, torch.Tensor] = {}
    pos, offset = 0, 0
    for key in keys:
        if not isinstance(key, str) or key in out or pos >= len(shapes):
            raise ValueError(f"bad or repeated key {key!r} in the packing")
        ndim = shapes[pos]
        shape = tuple(shapes[pos + 1 : pos + 1 + ndim])
        if len(shape) != ndim or any(not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"bad shape for '{key}' in the packing")
        pos += 1 + ndim
        size = int(torch.tensor(shape).prod()) if shape else 1
        if offset + size > len(flat):
            raise ValueError("the packing describes more values than the array holds")
        out[key] = flat[offset : offset + size].reshape(shape).clone()
        offset += size
    if pos != len(shapes) or offset != len(flat):
        raise ValueError("the packing does not describe the whole array")
    return out
