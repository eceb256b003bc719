from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

# Tests use tiny tensors; on a 2-core CI box more threads only add contention.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A ZeroMQ context destroyed with linger 0 after the test."""
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A short directory under /tmp: ipc socket paths must stay under 107 characters."""
    d = tempfile.mkdtemp(prefix="ep", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)
