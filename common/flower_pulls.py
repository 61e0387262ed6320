"""Quick retries when a deployed message's objects are not there yet (Flower 1.42 waits 1 s, then 2, 4, ... up to 10 s).

A message crosses three hops in a deployment (ServerApp -> SuperLink -> SuperNode -> ClientApp, and back),
and each hop announces the message before its objects (the arrays, the records) have arrived. A receiver
that asks for an object too early gets "unavailable" and Flower's ``pull_objects`` backs off: 1 s, then 2 s,
4 s... (``PULL_INITIAL_BACKOFF`` / ``PULL_BACKOFF_CAP`` in ``flwr/supercore/constant.py``). Measured on a
loaded 2-core machine, a ClientApp spent 1.5-7.9 s of its task waiting so for objects that arrived a
fraction of a second after the first try. :func:`quick_pulls` gives one module's reference to Flower's
pull function shorter retries (0.05 s, doubling up to 0.5 s), with as many more tries as keep
Flower's give-up time (about 83 minutes of waiting for one object); every other argument stays Flower's.

``FEDFUSE_FLOWER_PULL_RETRIES=1`` in a process's environment keeps Flower's own retries there
(``fedfuse bench deploy-round`` sets it to measure the difference).

Pinned to the Flower release it was written against: it checks the version, that the module still holds
Flower's own function and that the function still takes those arguments, and raises
:class:`FlowerInternalsChanged` otherwise.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from importlib.metadata import version
from types import ModuleType
from typing import Any

from common.errors import FedfuseError

FLOWER_SERIES = "1.42."  # the release whose inflatable_utils this was checked against
FLOWER_PULLS = "flwr.supercore.inflatable.inflatable_utils"
PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")
FLOWER_BACKOFF = (1, 10, 500)  # Flower's (initial_backoff, backoff_cap) defaults in seconds, and max_tries_per_object
INITIAL_BACKOFF = 0.05  # seconds before the first retry of an object that is not there yet
BACKOFF_CAP = 0.5  # seconds between later retries
KEEP_FLOWER_RETRIES = "FEDFUSE_FLOWER_PULL_RETRIES"  # "1": leave Flower's retries alone (benchmarks)


def _waited(initial: float, cap: float, tries: int) -> float:
    """Seconds spent waiting before giving up on an object after ``tries`` tries (without jitter)."""
    return sum(min(initial * 2 ** min(i, 60), cap) for i in range(tries - 1))


def _tries(initial: float, cap: float) -> int:
    """Tries whose waits add up to at least Flower's own give-up time (about 83 minutes for one object)."""
    flower = _waited(*FLOWER_BACKOFF)
    tries = int(flower / cap) + 1
    while _waited(initial, cap, tries) < flower:
        tries += 1
    return tries


class FlowerInternalsChanged(FedfuseError):
    """The installed Flower does not pull objects as the release this was written against."""


def quick_pulls(module: ModuleType, name: str, *, initial: float = INITIAL_BACKOFF, cap: float = BACKOFF_CAP) -> None:
    """Make ``module.<name>`` (Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree``) retry sooner."""
    import importlib

    if os.environ.get(KEEP_FLOWER_RETRIES) == "1":
        return

    installed = version("flwr")
    if not installed.startswith(FLOWER_SERIES):
        raise FlowerInternalsChanged(
            f"quick object pulls were written for Flower {FLOWER_SERIES}x, but flwr {installed} is installed; "
            f"install flwr {FLOWER_SERIES}x (constraints.txt)"
        )
    if name not in PULL_FUNCTIONS or not 0 < initial <= cap:
        raise ValueError(f"name must be one of {PULL_FUNCTIONS} and 0 < initial <= cap, got {name!r}, {initial}, {cap}")
    current: Any = getattr(module, name, None)
    if isinstance(current, functools.partial) and getattr(current, "_fedfuse_quick", False):
        return  # done already
    original: Callable[..., Any] = getattr(importlib.import_module(FLOWER_PULLS), name)
    if current is not original:
        raise FlowerInternalsChanged(f"{module.__name__}.{name} is no longer Flower's {FLOWER_PULLS}.{name}")
    params = inspect.signature(original).parameters
    keys = ("initial_backoff", "backoff_cap", "max_tries_per_object")
    defaults = tuple(params[p].default if p in params else None for p in keys)
    if defaults != FLOWER_BACKOFF:
        raise FlowerInternalsChanged(
            f"{FLOWER_PULLS}.{name} no longer backs off as in Flower {FLOWER_SERIES}x "
            f"({', '.join(keys)} = {defaults}, expected {FLOWER_BACKOFF})"
        )
    quick = functools.partial(original, initial_backoff=initial, backoff_cap=cap, max_tries_per_object=_tries(initial, cap))
    quick._fedfuse_quick = True  # type: ignore[attr-defined]
    setattr(module, name, quick)
