"""Shared fixtures: small synthetic data, offline Flower settings, one torch thread."""

from __future__ import annotations

import os

import pytest
import torch

from common.data import synthetic
from common.offline import OFFLINE_FLOWER

torch.set_num_threads(1)
for _key, _value in OFFLINE_FLOWER.items():
    os.environ.setdefault(_key, _value)


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
