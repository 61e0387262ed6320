"""A client's side of secure aggregation: Flower's SecAgg+ stages around the ordinary train handler.

Flower's ``secaggplus_mod`` runs the protocol (keys, shares, masking, unmasking). In its third stage
it calls :func:`handle_secure_train`, which trains exactly as without secure aggregation
(``handle_train``) and turns the reply into what SecAgg+ sums:

- **masked**: for every key of the global head, in the server's ``layout`` order, this client's change
  from the global value (zeros for keys it does not hold), then one array with a 1 for each key it
  holds and 0 elsewhere. SecAgg+ multiplies the whole vector by the client's weight
  (``num_examples / secagg.max-weight``) before masking, so the sum holds, per key, the weighted sum
  of the changes and the total weight of the clients holding that key (``server/secagg.py``).
- **in the clear**: identity, status, privacy metrics and the signed ledger, as in a plain reply.
  A client that does not train this round (budget exhausted, site policy) sends zeros with weight
  0: it completes the protocol and adds nothing to the sum.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.handlers import handle_train
from client.site import SiteContext
from common import messages as M
from common.config import parse_run_config
from common.errors import ConfigError, NonFiniteError


def is_secure_message(message: Message) -> bool:
    """Whether a train message is one of SecAgg+'s stages (the server runs with secagg.enabled)."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def encode_update(
    update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    layout: list[str],
    *,
    weight: float,
    clipping_range: float,
) -> list[np.ndarray]:
    """The vector SecAgg+ masks: per key of ``layout`` the change from ``reference`` (or zeros), then 1 per held key."""
    # weight: the factor SecAgg+ multiplies the vector by (n / max-weight); the check below must use it
    unknown = sorted(set(update) - set(layout))
    if unknown:
        raise ValueError(f"keys {unknown[:3]} are not in the federation's head: they cannot be securely aggregated")
    changes, held = [], np.zeros(len(layout))
    for i, key in enumerate(layout):
        ref = reference[key].detach().to(torch.float64)
        if key not in update:
            changes.append(np.zeros(tuple(ref.shape)))
            continue
        value = update[key].detach().to(torch.float64)
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"'{key}' has shape {tuple(value.shape)}, the global head {tuple(ref.shape)}")
        change = (value - ref).numpy()
        if not np.isfinite(change).all():
            raise NonFiniteError(f"'{key}' holds non-finite values; the update is not sent")
        changes.append(change)
        held[i] = 1.0
    peak = max((float(np.abs(c).max()) for c in changes if c.size), default=0.0) * weight
    if peak > clipping_range:
        raise ConfigError(
            f"a weighted change of the head reaches {peak:.3g}, outside secagg.clipping-range = {clipping_range:g}: "
            "SecAgg+ would clip it and corrupt the sum. Raise secagg.clipping-range (or lower train.lr)"
        )
    return changes + [held]


def _admit(site: SiteContext, *, max_weight: int) -> None:
    """Refuse, before training, a site whose weight would not fit SecAgg+'s range."""
    if site.declared_examples > max_weight:
        raise ConfigError(
            f"{site.client_id} declares {site.declared_examples} training examples, more than secagg.max-weight = "
            f"{max_weight}; its weight would overflow SecAgg+'s range. Set secagg.max-weight >= {site.declared_examples} "
            "(the sum's rounding error grows with it: README, Secure aggregation)"
        )


def handle_secure_train(message: Message, context: Context) -> Message:
    """SecAgg+'s third stage: train on the global head in the FitIns; reply with the vector to mask and the clear parts."""
    config = parse_run_config(context.run_config)
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    layout = json.loads(str(fitins.config[M.LAYOUT]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(layout):
        raise ValueError(f"the server sent {len(arrays)} arrays for a layout of {len(layout)} keys")
    reference = {key: torch.from_numpy(np.array(a, copy=True)) for key, a in zip(layout, arrays)}

    # Train as without secure aggregation: the handler reads the Message-API records
    for name, record in M.pack_arrays(reference).items():
        message.content[name] = record
    message.content[M.CONFIG] = ConfigRecord({k: fitins.config[k] for k in (M.SERVER_ROUND, M.RUN_ID, M.PLANNED_ROUNDS)})
    reply = handle_train(message, context, admit=functools.partial(_admit, max_weight=config.secagg.max_weight))

    # Masked: the weighted changes (zeros with weight 0 when the client did not train); in the clear: the rest
    identity = dict(reply.content.config_records[M.CLIENT])
    metrics = dict(reply.content.metric_records[M.METRICS])
    trained = identity.get(M.STATUS) == M.STATUS_OK
    weight = int(metrics[M.NUM_EXAMPLES]) if trained else 0
    update = M.unpack_arrays(reply.content) if trained else {}
    vector = encode_update(
        update, reference, layout, weight=weight / config.secagg.max_weight, clipping_range=config.secagg.clipping_range
    )
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), weight, {**metrics, M.CLIENT: json.dumps(identity)})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=message)
