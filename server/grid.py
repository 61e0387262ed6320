"""How the ServerApp talks to the sites: replies polled every 0.2 s (0.01 s in a simulation), missing replies made
explicit, bounded node waits.

Flower's deployment grid (``HttpGrid.send_and_receive``) sleeps a fixed 3 s between pulls and
returns a reply that never came as nothing at all; ``sample_nodes`` waits without limit for
``min_available_nodes``. :class:`PollingGrid` wraps any grid (deployment or simulation) so that
each message phase ends as soon as the last reply arrives and every unanswered message becomes an
error reply the strategy records; :func:`sample_nodes` gives up after a deadline with a
:class:`NodesUnavailableError` that says what to do.

``FEDFUSE_REPLY_POLL_INTERVAL`` (seconds, in the SuperLink's environment) changes the polling
interval; ``fedfuse bench deploy-round`` sets it to 3 to measure Flower's own behaviour.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common.errors import FedfuseError
from common.flower_pulls import FlowerInternalsChanged, quick_pulls

log = logging.getLogger("fedfuse.server")

POLL_INTERVAL = float(os.environ.get("FEDFUSE_REPLY_POLL_INTERVAL", "0.2"))  # s between pulls (Flower's HttpGrid: 3)
# A simulation's replies are in this process's memory: a pull costs microseconds, so poll often. Its last reply was
# picked up 50-95 ms after the site's handler returned with Flower's 0.1 s, 11-15 ms now (bench round-overhead).
SIMULATION_POLL_INTERVAL = 0.01
# In a simulation a pull is the server's own CPU (a pull with 1,000 replies pending costs 3 ms): the wait between
# pulls is at least this many times the last pull's cost, so polling stays under about 5 % of the server's time.
# Not in a deployment, where a pull's time is mostly waiting for the SuperLink and the objects.
PULL_SHARE = 20
NODE_POLL_INTERVAL = 1.0  # seconds between checks for connected nodes (as Flower's sample_nodes)
NO_REPLY = "no reply within {timeout:g} s (round-timeout): the site is offline, stopped or too slow"


class NodesUnavailableError(FedfuseError):
    """Fewer sites than min-clients stayed connected for longer than the run waits for them."""


class PollingGrid(Grid):
    """A Grid that delegates to Flower's, polls replies every ``interval`` s and reports missing ones as errors."""

    def __init__(
        self, grid: Grid, *, interval: float = POLL_INTERVAL, timing_level: int = logging.DEBUG, pull_share: float | None = None
    ):
        self._grid = grid
        self.timing_level = timing_level  # of each phase's line (push time, when each reply arrived)
        self.names: dict[int, str] = {}  # node id -> the name given at `flwr supernode register --name` (deployment)
        self.on_reply: Callable[[Message], None] | None = None  # called with each reply as it arrives
        # Never poll slower than the wrapped grid would; a simulation's grid (in memory) every 0.01 s
        self.interval = min(interval, float(getattr(grid, "pull_interval", interval)))
        in_memory = isinstance(grid, InMemoryGrid)
        if in_memory:
            self.interval = min(self.interval, SIMULATION_POLL_INTERVAL)
        self.pull_share = (PULL_SHARE if in_memory else 0.0) if pull_share is None else pull_share

    # --- plain delegation ------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        if not hasattr(self._grid, "get_nodes"):
            return self._grid.get_node_ids()
        return [node.node_id for node in self.get_nodes()]

    def get_nodes(self) -> Iterable[Any]:
        nodes = list(self._grid.get_nodes())
        self.names.update({n.node_id: n.name for n in nodes if getattr(n, "name", "")})  # kept once a node is offline
        return nodes

    def describe(self, node: int) -> str:
        """A node as the run's log shows it: its registered name, else its node id."""
        return self.names.get(node) or f"node {node}"

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:  # anything else a runtime's grid offers
        return getattr(self._grid, name)

    # --- the part that differs -------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, pull replies until all arrived or ``timeout`` s passed; one error reply per missing one."""
        messages = list(messages)
        if not messages:
            return []
        started = time.monotonic()
        ids = list(self._grid.push_messages(messages))
        pushed = time.monotonic() - started
        arrived: list[float] = []
        sent = {mid: msg for mid, msg in zip(ids, messages) if mid}
        pending = set(sent)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulling = time.monotonic()
            got = [_from_destination(m, sent) for m in self._grid.pull_messages(pending)]
            pull_cost = time.monotonic() - pulling
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            arrived += [time.monotonic() - started] * len(got)
            if (hook := self.on_reply) is not None:
                for reply in got:
                    hook(reply)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(max(self.interval, self.pull_share * pull_cost))
        log.log(
            self.timing_level,
            "%s: %d message(s) pushed in %.2f s; replies after %s s",
            messages[0].metadata.message_type,
            len(messages),
            pushed,
            ", ".join(f"{t:.2f}" for t in arrived) or "-",
        )
        for mid in sorted(pending):  # make a silent absence explicit, as Flower does for a node it knows is offline
            msg = sent[mid]
            log.warning(
                "%s sent no %s reply within %g s (round-timeout)",
                self.describe(msg.metadata.dst_node_id),
                msg.metadata.message_type,
                timeout,
            )
            replies.append(
                Message(Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason=NO_REPLY.format(timeout=timeout)), reply_to=msg)
            )
        return replies


def quick_reply_pulls() -> None:
    """A deployment's replies, announced before their objects arrive: retried after 0.05 s, not 1 s (Flower 1.42)."""
    from flwr.superlink.grid import http_grid

    try:
        quick_pulls(http_grid, "pull_objects")
    except FlowerInternalsChanged as exc:  # slower, not wrong: keep Flower's own retries
        log.warning("replies are pulled with Flower's own retries (1 s, 2 s, ...): %s", exc)


def _from_destination(reply: Message, sent: dict[str, Message]) -> Message:
    """An error the SuperLink wrote for an offline node comes from the SuperLink's id: attribute it to the node."""
    request = sent.get(reply.metadata.reply_to_message_id)
    if request is None or not reply.has_error() or reply.metadata.src_node_id == request.metadata.dst_node_id:
        return reply
    return Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=request)


def sample_nodes(grid: Grid, min_available: int, sample_size: int, *, wait: float) -> tuple[list[int], list[int]]:
    """Flower's ``sample_nodes``, but waiting at most ``wait`` s for ``min_available`` connected nodes."""
    needed = max(min_available, sample_size)
    deadline = time.monotonic() + wait
    logged = -1
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() >= deadline:
            log.error("gave up waiting for sites: %d connected after %g s, min-clients needs %d", len(nodes), wait, needed)
            raise NodesUnavailableError(
                f"only {len(nodes)} site(s) connected after waiting {wait:g} s (round-timeout), but the run needs "
                f"{needed} (min-clients); start or restart the missing SuperNodes, or lower min-clients"
            )
        if len(nodes) != logged:
            log.info("waiting for sites: %d connected, %d needed (giving up after %g s)", len(nodes), needed, wait)
            logged = len(nodes)
        time.sleep(min(NODE_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
    return random.sample(nodes, sample_size), nodes
