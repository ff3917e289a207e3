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
