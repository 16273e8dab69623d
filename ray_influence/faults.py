"""Test-only fault injection, in one place: :func:`inject` does nothing unless a test enables it.

A test enables a fault with an environment variable (the Ray workers inherit it through
:data:`ENVS`, passed on by :func:`ray_influence.worker.remote_worker`):

    RAY_INFLUENCE_TEST_INDEX_DELAY_S     every corpus-pass task sleeps that many seconds first
                                         (widens the window in which a test kills a run)
    RAY_INFLUENCE_TEST_CRASH_ONCE        a flag-file path: the first corpus-pass task to find
                                         it missing creates it and kills its worker process
    RAY_INFLUENCE_TEST_CRASH_PEER_ONCE   the same for a peer shard, in its first forward of a
                                         corpus pass

Points: ``"corpus_task"`` (a partition's task on the replica's worker or head) and
``"peer_forward"`` (a peer shard's forward in a corpus pass).
"""

from __future__ import annotations

import os
import time

DELAY_ENV = "RAY_INFLUENCE_TEST_INDEX_DELAY_S"
CRASH_ONCE_ENV = "RAY_INFLUENCE_TEST_CRASH_ONCE"
CRASH_PEER_ONCE_ENV = "RAY_INFLUENCE_TEST_CRASH_PEER_ONCE"
ENVS = (DELAY_ENV, CRASH_ONCE_ENV, CRASH_PEER_ONCE_ENV)

_CRASH_AT = {"corpus_task": CRASH_ONCE_ENV, "peer_forward": CRASH_PEER_ONCE_ENV}


def _crash_once(flag: str | None) -> None:
    if flag and not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(1)  # the process dies as a preempted or OOM-killed worker would


def inject(point: str) -> None:
    """Runs the faults a test enabled at ``point``; a no-op otherwise."""
    if point not in _CRASH_AT:
        raise ValueError(f"unknown fault point {point!r}; expected one of {tuple(_CRASH_AT)}")
    if point == "corpus_task" and DELAY_ENV in os.environ:
        time.sleep(float(os.environ[DELAY_ENV]))
    _crash_once(os.environ.get(_CRASH_AT[point]))
