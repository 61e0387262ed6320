"""Flower 1.42's SuperNode, run with shorter waits: what ``fedfuse site supernode`` starts.

Flower's SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps a fixed 3 s after every
pull that found no message, and 0.5 s between checks for its ClientApp's reply and for the reply's
contents. Those constants are the floor of every deployed message phase: a message waits up to 3 s
before its site even sees it. This module runs Flower's own ``flower-supernode`` entry point,
unchanged, with the ``time`` module of that one file replaced by a stand-in whose ``sleep`` maps
those two constants to shorter waits (every other call goes to the real ``time``), and retries a
message's objects that are not at the SuperLink yet after 0.05 s instead of 1 s (``common/flower_pulls.py``).

It is pinned to the Flower release whose source it was written against: it checks the version and
that the loop still sleeps where it did, and refuses to start otherwise (with what to do), so a
Flower upgrade can never silently change what runs.

    python -m client.supernode [--pull-wait S] [--reply-wait S] -- <flower-supernode options>
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from importlib.metadata import version
from types import ModuleType
from typing import Any

from common.errors import ConfigError
from common.flower_pulls import FlowerInternalsChanged, quick_pulls

FLOWER_VERSION = "1.42.0"  # the release whose start_client_internal.py this was checked against
LOOP_MODULE = "flwr.supernode.start_client_internal"
FLOWER_PULL_WAIT = 3  # Flower's sleep after an empty pull
FLOWER_REPLY_WAIT = 0.5  # Flower's sleep between checks for a reply (and for its contents)
# How often each constant appears in the loop's source (a changed count means a changed loop)
EXPECTED_SLEEPS = {f"time.sleep({FLOWER_PULL_WAIT})": 1, f"time.sleep({FLOWER_REPLY_WAIT})": 2}
PULL_WAIT = 0.2  # seconds; one HTTPS request per wait to the SuperLink while idle
REPLY_WAIT = 0.05  # seconds; a local check of the SuperNode's own state


class ShortWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its fixed sleeps become shorter."""

    def __init__(self, *, pull: float, reply: float):
        self.waits = {FLOWER_PULL_WAIT: pull, FLOWER_REPLY_WAIT: reply}

    def sleep(self, seconds: float) -> None:
        time.sleep(self.waits.get(seconds, seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def check_loop(source: str, installed: str) -> None:
    """Refuse a Flower release (``installed``), or a loop (its ``source``), other than the one this was written against."""
    if installed != FLOWER_VERSION:
        raise ConfigError(
            f"fedfuse site supernode shortens the waits of Flower {FLOWER_VERSION}'s SuperNode loop, but flwr "
            f"{installed} is installed; install flwr=={FLOWER_VERSION} (constraints.txt), or run flower-supernode "
            "with `fedfuse site executor` beside it (Flower's own 3 s waits)"
        )
    found = {call: source.count(call) for call in EXPECTED_SLEEPS}
    if found != EXPECTED_SLEEPS:
        raise ConfigError(
            f"{LOOP_MODULE} no longer sleeps as in Flower {FLOWER_VERSION} (found {found}, expected "
            f"{EXPECTED_SLEEPS}); reinstall flwr=={FLOWER_VERSION}"
        )


def shorten_waits(*, pull: float = PULL_WAIT, reply: float = REPLY_WAIT) -> ModuleType:
    """Check the installed loop, then give it short waits; return its module."""
    if not (0 < pull <= FLOWER_PULL_WAIT and 0 < reply <= FLOWER_REPLY_WAIT):
        raise ConfigError(
            f"--pull-wait must be in (0, {FLOWER_PULL_WAIT}] and --reply-wait in (0, {FLOWER_REPLY_WAIT}] "
            f"seconds, got {pull:g} and {reply:g}"
        )
    module = importlib.import_module(LOOP_MODULE)
    check_loop(inspect.getsource(module), version("flwr"))
    module.time = ShortWaits(pull=pull, reply=reply)  # type: ignore[attr-defined]
    try:  # a message's objects, not yet at the SuperLink when the message is: retried after 0.05 s, not 1 s
        quick_pulls(module, "pull_objects")
    except FlowerInternalsChanged as exc:
        raise ConfigError(f"{exc}; reinstall flwr=={FLOWER_VERSION}") from exc
    return module


def main(argv: list[str] | None = None) -> None:
    """Run flower-supernode with the options after ``--``, its loop's waits shortened."""
    parser = argparse.ArgumentParser(prog="python -m client.supernode", description=__doc__.splitlines()[0])
    parser.add_argument("--pull-wait", type=float, default=PULL_WAIT, help="seconds after an empty pull (Flower: 3)")
    parser.add_argument(
        "--reply-wait", type=float, default=REPLY_WAIT, help="seconds between checks for the ClientApp's reply (Flower: 0.5)"
    )
    parser.add_argument("flower_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    try:
        shorten_waits(pull=args.pull_wait, reply=args.reply_wait)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
