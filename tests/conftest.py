"""Shared fixtures: tiny float64 models of the four architectures, and example builders."""

from __future__ import annotations

import random

import pytest
import torch

from ray_influence.passes import freeze
from ray_influence.tokens import Example
from ray_influence.toy import ARCHITECTURES, tiny_model

ARCHS = tuple(ARCHITECTURES)
VOCAB = 40


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
