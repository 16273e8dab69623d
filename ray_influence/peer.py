"""The peer side of a sharded replica: the passes a peer shard runs for its head.

With ``cluster.shards: S > 1`` a replica is ``S`` worker actors. Shard 0, the head, runs
the passes (:class:`ray_influence.replica.PipelinedReplica`): for each one it opens a
*session* on every peer (:meth:`PeerShard.open_session`: the peer's own collector over its
own modules, from the pass's :class:`~ray_influence.pass_spec.PassSpec`), pushes
micro-batches through them (``shard_forward`` / ``shard_backward``), and then asks each peer
to finish in place (:meth:`PeerShard.finish`: the same per-shard step the head runs on its
own part, :mod:`ray_influence.shard_steps`). So a peer's large arrays never pass through
the head.

A peer that died and was restarted by Ray has lost its sessions: it raises
:class:`ray_influence.pipeline.ShardLost`, and the driver retries the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import faults
from .attribution import FISHER_LABEL_STREAM, PassPlan
from .pass_spec import PassSpec, plan_for
from .pipeline import ShardLost, ShardSession, Step
from .shard_host import ShardHost


@dataclass
class ShardPass:
    """One shard's side of a pass that ran: its spec and the collector it filled."""

    spec: PassSpec
    plan: PassPlan


def open_shard_session(host: ShardHost, spec: PassSpec) -> tuple[ShardSession, ShardPass]:
    """``host``'s :class:`ShardSession` of one pass (head and peers alike), with its collector."""
    plan = plan_for(spec, host)
    session = ShardSession(host.model(spec.stage), host.specs(spec.stage), plan.collector, plan.labels,
                           host.cfg.ekfac.seed, FISHER_LABEL_STREAM, plan.on_batch)
    return session, ShardPass(spec, plan)


class PeerShard:
    """A peer shard's open passes (sessions), over its :class:`ShardHost`."""

    def __init__(self, host: ShardHost):
        self.host = host
        self._sessions: dict[str, tuple[ShardSession, ShardPass]] = {}

    def open_session(self, sid: str, spec: PassSpec) -> None:
        """Opens pass ``sid`` with this shard's own collector."""
        self._sessions[sid] = open_shard_session(self.host, spec)

    def _session(self, sid: str) -> tuple[ShardSession, ShardPass]:
        if sid not in self._sessions:  # this actor restarted: the pass must start over
            raise ShardLost(f"shard {self.host.shard} has no pass {sid} (restarted?)")
        return self._sessions[sid]

    def shard_forward(self, sid: str, bid: int, batch, hidden: torch.Tensor):
        session, done = self._session(sid)
        if done.spec.corpus:
            faults.inject("peer_forward")
        return session.forward(bid, batch, hidden)

    def shard_backward(self, sid: str, bid: int, step: Step) -> Step:
        return self._session(sid)[0].backward(bid, step)

    def finish(self, sid: str, step: Callable[..., Any], *args) -> Any:
        """Closes pass ``sid`` and returns ``step(host, ShardPass, *args)`` (a :mod:`~ray_influence.shard_steps` step)."""
        done = self._session(sid)[1]
        del self._sessions[sid]
        return step(self.host, done, *args)

    def call(self, step: Callable[..., Any], *args) -> Any:
        """``step(host, *args)``: a per-shard step outside a pass."""
        return step(self.host, *args)

    def close_session(self, sid: str) -> None:
        self._sessions.pop(sid, None)
        self.host.held.pop(sid, None)

    def close_all_sessions(self) -> None:
        self._sessions.clear()
        self.host.held.clear()
