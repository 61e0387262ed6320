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
