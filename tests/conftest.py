"""Shared test fixtures: deterministic seeds, a free loopback port for gloo."""
import socket

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def pytest_collection_modifyitems(config, items):
    """Every test that skips without CUDA carries the ``gpu`` marker, so that ``pytest -m gpu``
    (and ``tools/gpu_check.sh``) runs them all."""
    for item in items:
        needs_cuda = any(m.args and m.args[0] is True and "CUDA" in str(m.kwargs.get("reason"))
                         for m in item.iter_markers("skipif"))   # (skipped here for want of CUDA)
        if needs_cuda and item.get_closest_marker("gpu") is None:
            raise pytest.UsageError(f"{item.nodeid} needs CUDA but has no gpu marker")
