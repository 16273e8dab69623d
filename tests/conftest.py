"""Shared fixtures: tiny float64 models of the four architectures, and example builders.

``RAY_INFLUENCE_TEST_THREADS=N`` runs the tests with ``torch.set_num_threads(N)`` (and
``OMP_NUM_THREADS=N`` for the processes they start); unset, torch's default. Either way
every test starts at that count: code that sets it in this process (an in-process
``Worker`` sets its configured CPUs) does not carry over into the next test.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from ray_influence.passes import freeze
from ray_influence.tokens import Example
from ray_influence.toy import ARCHITECTURES, tiny_model

ARCHS = tuple(ARCHITECTURES)
VOCAB = 40
THREADS_ENV = "RAY_INFLUENCE_TEST_THREADS"
_THREADS: list[int] = []


def pytest_configure(config):
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        n = int(value)
        torch.set_num_threads(n)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # subprocesses and Ray workers started from here
            os.environ[var] = str(n)
        if torch.get_num_threads() != n:
            raise pytest.UsageError(f"{THREADS_ENV}={n} did not take effect: torch uses {torch.get_num_threads()}")
    _THREADS[:] = [torch.get_num_threads()]


def pytest_report_header(config):
    return (f"torch threads: {torch.get_num_threads()} ({THREADS_ENV}={os.environ.get(THREADS_ENV, 'unset')}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts at the session's thread count, whatever the test before it set."""
    if _THREADS and torch.get_num_threads() != _THREADS[0]:
        torch.set_num_threads(_THREADS[0])
    yield


def random_examples(n: int, vocab: int = VOCAB, min_len: int = 3, max_len: int = 9, seed: int = 0,
                    prompt_len: int = 0) -> list[Example]:
    """``n`` random token sequences of different lengths (so batches carry padding).

    With ``prompt_len > 0`` the first ``prompt_len`` tokens are a prompt outside the loss.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        ids = tuple(rng.randrange(3, vocab) for _ in range(length))
        mask = tuple(t > 0 and t >= prompt_len for t in range(length))
        out.append(Example(f"doc{i}", ids, mask))
    return out


@pytest.fixture(scope="session", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def model64(arch):
    return freeze(tiny_model(arch, VOCAB, hidden=8, layers=2, heads=2, dtype=torch.float64))


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray per test module (2 CPUs, pinned object store)."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc, timeout_s: float, what: str) -> None:
    """Polls ``url`` until it answers; fails if ``proc`` exits or ``timeout_s`` passes."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not come up (exit {proc.poll()})")
            time.sleep(0.2)
