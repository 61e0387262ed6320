"""client/supernode.py: Flower 1.42's SuperNode loop with short waits, checked against the installed Flower."""

import importlib
import inspect
import time

import pytest

from client import supernode
from common.errors import ConfigError


@pytest.fixture
def loop_module(monkeypatch):
    """Flower's SuperNode loop module; whatever a test gives it as ``time`` is put back afterwards."""
    module = importlib.import_module(supernode.LOOP_MODULE)
    monkeypatch.setattr(module, "time", module.time)
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    return module


def test_the_installed_flower_is_the_release_whose_loop_was_read(loop_module):
    from importlib.metadata import version

    assert version("flwr") == supernode.FLOWER_VERSION
    supernode.check_loop(inspect.getsource(loop_module), version("flwr"))  # the sleeps are where they were read


def test_the_loop_sleeps_briefly_where_flower_sleeps_3_s_and_half_a_second(loop_module, monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    supernode.shorten_waits(pull=0.2, reply=0.05)
    # the loop's own calls, as its source writes them
    loop_module.time.sleep(3)
    loop_module.time.sleep(0.5)
    loop_module.time.sleep(1.25)  # any other wait is left alone
    assert slept == [0.2, 0.05, 1.25]
    assert loop_module.time.monotonic is time.monotonic  # everything else is the real time module


def test_another_flower_release_or_a_changed_loop_is_refused(loop_module):
    source = inspect.getsource(loop_module)
    with pytest.raises(ConfigError, match="flwr 1.43.0 is installed; install flwr==1.42.0"):
        supernode.check_loop(source, "1.43.0")
    with pytest.raises(ConfigError, match="no longer sleeps as in Flower 1.42.0"):
        supernode.check_loop(source.replace("time.sleep(3)", "time.sleep(backoff)"), "1.42.0")


def test_waits_out_of_range_are_refused_with_the_limits():
    with pytest.raises(ConfigError, match=r"--pull-wait must be in \(0, 3\]"):
        supernode.shorten_waits(pull=0, reply=0.05)


def _objects_arriving_after(seconds):
    """A pull function whose object is unavailable for ``seconds`` (as a message's objects still on their way)."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    ready = time.monotonic() + seconds
    calls = []

    def pull(object_id):
        calls.append(time.monotonic())
        if time.monotonic() < ready:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return pull, calls


def test_the_supernode_retries_objects_not_there_yet_within_a_fraction_of_a_second(loop_module):
    # Prepare: Flower's own function waits 1 s (+-20 %) before its first retry
    pull, calls = _objects_arriving_after(0.1)
    started = time.monotonic()
    assert loop_module.pull_objects(["a"], pull) == {"a": b"content"}
    assert time.monotonic() - started >= 0.75
    # Execute: the loop as fedfuse site supernode runs it
    supernode.shorten_waits()
    pull, calls = _objects_arriving_after(0.1)
    started = time.monotonic()
    got = loop_module.pull_objects(["a"], pull)
    # Assert: the same objects, retried quickly (0.05, 0.1, 0.2 s ...), and no sooner than that
    assert got == {"a": b"content"} and time.monotonic() - started < 0.6
    assert all(b - a >= 0.03 for a, b in zip(calls, calls[1:])) and len(calls) <= 5


def test_quick_pulls_refuse_a_module_whose_function_is_no_longer_flowers(monkeypatch):
    import types

    from common.flower_pulls import FlowerInternalsChanged, quick_pulls

    module = types.ModuleType("stand_in")
    module.pull_objects = lambda *a, **k: {}
    with pytest.raises(FlowerInternalsChanged, match="no longer Flower's"):
        quick_pulls(module, "pull_objects")


def test_the_serverapp_and_the_clientapp_pull_with_quick_retries(monkeypatch):
    from flwr.superlink.grid import http_grid
    from flwr.supernode.runtime import run_clientapp

    from client.executor import TaskTimer, _time_steps
    from server.grid import quick_reply_pulls

    for module, name in ((http_grid, "pull_objects"), (run_clientapp, "pull_and_inflate_object_from_tree")):
        monkeypatch.setattr(module, name, getattr(module, name))
    for name in ("pull_task_input", "install_from_fab", "push_message"):
        monkeypatch.setattr(run_clientapp, name, getattr(run_clientapp, name))
    quick_reply_pulls()
    _time_steps(TaskTimer(1))
    assert http_grid.pull_objects.keywords.items() >= {"initial_backoff": 0.05, "backoff_cap": 0.5}.items()
    assert (
        run_clientapp.pull_and_inflate_object_from_tree.keywords.items() >= {"initial_backoff": 0.05, "backoff_cap": 0.5}.items()
    )


def test_flowers_own_retries_are_kept_on_request(loop_module, monkeypatch):
    from common.flower_pulls import KEEP_FLOWER_RETRIES

    original = loop_module.pull_objects
    monkeypatch.setenv(KEEP_FLOWER_RETRIES, "1")
    supernode.shorten_waits()
    assert loop_module.pull_objects is original


def test_quick_retries_give_an_object_up_no_sooner_than_flower_does():
    from common.flower_pulls import _tries, _waited

    tries = _tries(0.05, 0.5)
    assert _waited(1, 10, 500) <= _waited(0.05, 0.5, tries) < _waited(1, 10, 500) + 1
