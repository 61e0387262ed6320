"""fedfuse ClientApp: wires Flower's train and evaluate messages to the client handlers.

A handler that fails never sends its error to the server (Flower would send the exception's text): the
details go to the site's log and the reply says only that the site failed (``handlers.failure_reply``).
"""

import logging
from collections.abc import Callable

import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client.handlers import failure_reply, handle_evaluate, handle_train
from client.secagg import handle_secure_train, is_secure_message
from common import messages as M
from common.logs import flower_lines_once

log = logging.getLogger("fedfuse.client")

torch.set_num_threads(1)  # one ClientApp per core; more threads only contend (measured: 10x slower under load)
flower_lines_once()  # this process may be a Ray worker or a site's task: nothing else sets its logging up

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this site's encoders + the shared head with DP-SGD; reply with the head only."""
    if is_secure_message(msg):  # secagg.enabled: SecAgg+'s four stages, training in the third
        return _guarded(lambda m, c: secaggplus_mod(m, c, handle_secure_train), msg, context, secure=True)
    return _guarded(handle_train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate on this site's held-out split, overall and per modality subset."""
    return _guarded(handle_evaluate, msg, context)


class SiteFailure(Exception):
    """Raised in place of any error inside SecAgg+ (whose protocol needs an error reply): its text is a category."""


def _guarded(handler: Callable[[Message, Context], Message], msg: Message, context: Context, *, secure: bool = False) -> Message:
    """Run a handler; on any error, log it here (the site's log) and tell the server only that this site failed."""
    try:
        return handler(msg, context)
    except Exception:
        log.exception(
            "this site failed a %s message; the server is told only '%s' (details here)",
            msg.metadata.message_type,
            M.FAILURE_SITE,
        )
        if secure:
            raise SiteFailure(M.FAILURE_SITE) from None
        return failure_reply(msg, context)
