"""Shared pytest set-up: offline environment, a network guard, small thread count, a few fixtures.

Offline first (DESIGN.md): the environment variables below are set before any test module imports transformers,
huggingface_hub, gradio or tqdm, and the autouse `no_network` fixture fails any test that tries to open a
connection to anything but this machine (loopback and Unix sockets stay allowed: Jupyter kernels, Gradio on
127.0.0.1 and torch.distributed over gloo use them).
"""

from __future__ import annotations

import os
import socket

import pytest

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "MPLBACKEND": "Agg",
    "VLM_LAB_SCALE": "toy",
}.items():
    os.environ[_key] = _value

import torch  # noqa: E402  (after the environment is set)

# The test machine has two shared cores; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))

_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "::", ""}


def _is_local(address: object) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    if isinstance(address, tuple) and address:
        host = address[0]
        return isinstance(host, str) and (host in _LOOPBACK_HOSTS or host.startswith("127."))
    return False


class NetworkAccessError(RuntimeError):
    """Raised when a test tries to reach another machine."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to connect to a non-loopback address (tests must run offline)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_connect(self: socket.socket, address: object):
        if not _is_local(address):
            raise NetworkAccessError(f"test tried to connect to {address!r}; tests must not use the network")
        return real_connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: object):
        if not _is_local(address):
            raise NetworkAccessError(f"test tried to connect to {address!r}; tests must not use the network")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)


@pytest.fixture
def seeded() -> int:
    """Seed torch's global generator (returns the seed) so random initialisations are reproducible."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def run_dir(tmp_path):
    """An empty output folder for a training run or a checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    return out
