"""Shared fixtures: small synthetic data, offline Flower settings, one torch thread."""

from __future__ import annotations

import os

import pytest
import torch

from common.data import synthetic

torch.set_num_threads(1)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(scope="session")
def synth_train():
    return synthetic.generate(600, seed=11)


@pytest.fixture(scope="session")
def synth_test():
    return synthetic.generate(300, seed=12)


@pytest.fixture
def task_identity():
    """Flower's Message() reads the task identity the runtime normally sets; set one for direct handler calls."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
