"""One replica of the model runs a pass: the :class:`Replica` interface and its two forms.

A replica is the whole model in one process (:class:`LocalReplica`), or ``S`` shards of
it in ``S`` worker actors (:class:`PipelinedReplica`, ``cluster.shards: S > 1``), driven
by shard 0, the head. Both run a pass described by a
:class:`~ray_influence.pass_spec.PassSpec` and both answer *per shard*: a list with one
entry per shard, in shard order (one entry when local). The stages
(:mod:`ray_influence.corpus_pass`, :mod:`ray_influence.query_stage`,
:mod:`ray_influence.score_stage`) are written once against this interface.

A per-shard *step* is a module-level function (:mod:`ray_influence.shard_steps`) that a
shard runs on its own :class:`~ray_influence.shard_host.ShardHost`: ``step(host, *args)``
(:meth:`Replica.each`), or ``step(host, shard_pass, *args)`` once a pass ran
(:meth:`Replica.finish`). The head runs it in process; a peer runs it in its actor, so its
arrays stay there.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from . import attribution
from .pass_spec import PassSpec, plan_for
from .peer import ShardPass, open_shard_session
from .pipeline import ShardLost, pipelined_batches
from .shard_host import ShardHost
from .tokens import Example


@dataclass
class PassRun:
    """A pass that ran on every shard of a replica (the peers still hold it under ``sid``).

    Attributes:
        sid: the pass's session id.
        head: the head's (or the local model's) :class:`~ray_influence.peer.ShardPass`.
        kept: keys of the examples that reached the collectors, in collector order.
        losses: ``[len(kept)]`` float64 data losses.
        skipped: keys of the examples whose forward was not finite.
    """

    sid: str
    head: ShardPass
    kept: list[str]
    losses: torch.Tensor
    skipped: list[str]

    def rows(self, examples: Sequence[Example]) -> list[int]:
        """Input positions of the kept examples, in input order."""
        got = set(self.kept)
        return [i for i, e in enumerate(examples) if e.key in got]

    def order(self, examples: Sequence[Example]) -> list[int]:
        """The permutation taking collector order back to input order (:func:`attribution.input_order`)."""
        return attribution.input_order(examples, self.kept)


class Replica(Protocol):
    """Runs passes over one replica of the model and answers per shard."""

    host: ShardHost
    """The shard in this process (the head; the whole model when local)."""

    n_shards: int

    def run(self, spec: PassSpec, examples: Sequence[Example]) -> PassRun:
        """Runs ``examples`` through every shard into each shard's collector of ``spec``."""

    def finish(self, run: PassRun, step: Callable[..., Any], *args, fetch: bool = True) -> list:
        """Closes ``run`` on every shard: per shard, ``step(host, shard_pass, *args)``.

        ``fetch=False``: the peers' entries stay Ray object refs.
        """

    def close(self, run: PassRun) -> None:
        """Drops ``run`` on every shard without a result."""

    def each(self, step: Callable[..., Any], *args, fetch: bool = True) -> list:
        """Per shard, ``step(host, *args)``."""


class LocalReplica:
    """The whole model in this process: one shard."""

    n_shards = 1

    def __init__(self, host: ShardHost):
        self.host = host

    def run(self, spec: PassSpec, examples: Sequence[Example]) -> PassRun:
        h = self.host
        if h.layout is not None:
            raise RuntimeError(f"shard {h.shard} holds blocks {h.blocks} only; passes run from the "
                               "replica's first shard, which needs its peers")
        plan = plan_for(spec, h)
        kept, losses, skipped = attribution.run_batches(
            h.model(spec.stage), examples, h.specs(spec.stage), plan.collector, plan.labels, h.cfg.ekfac.seed,
            h.cfg.cluster.max_tokens_per_batch, plan.on_batch)
        return PassRun(uuid.uuid4().hex, ShardPass(spec, plan), kept, losses, skipped)

    def finish(self, run: PassRun, step: Callable[..., Any], *args, fetch: bool = True) -> list:
        return [step(self.host, run.head, *args)]

    def close(self, run: PassRun) -> None:
        self.host.held.pop(run.sid, None)

    def each(self, step: Callable[..., Any], *args, fetch: bool = True) -> list:
        return [step(self.host, *args)]


def peer_get(refs):
    """``ray.get`` of peer results; a dead peer becomes :class:`ShardLost` (the task is retried)."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayActorError as err:
        raise ShardLost(f"a shard of this replica died: {err}") from None


class PipelinedReplica:
    """Shard 0 of ``S`` (this process) and the actor handles of shards 1..S-1, its peers.

    Passes run pipeline-parallel (:func:`ray_influence.pipeline.pipelined_batches`); each
    shard keeps its own modules' statistics, index columns and query vectors.
    """

    def __init__(self, host: ShardHost, peers: Sequence):
        self.host = host
        self.peers = list(peers)
        self.n_shards = 1 + len(self.peers)

    def run(self, spec: PassSpec, examples: Sequence[Example]) -> PassRun:
        import ray

        sid = uuid.uuid4().hex
        peer_get([p.open_session.remote(sid, spec) for p in self.peers])
        session, head = open_shard_session(self.host, spec)
        try:
            kept, losses, skipped = pipelined_batches(session, self.peers, sid, examples,
                                                      self.host.cfg.cluster.max_tokens_per_batch)
        except ray.exceptions.RayActorError as err:
            raise ShardLost(f"a shard of this replica died mid-pass: {err}") from None
        except BaseException:
            self.close_sid(sid)
            raise
        return PassRun(sid, head, kept, losses, skipped)

    def finish(self, run: PassRun, step: Callable[..., Any], *args, fetch: bool = True) -> list:
        refs = [p.finish.remote(run.sid, step, *args) for p in self.peers]
        own = step(self.host, run.head, *args)
        return [own] + (peer_get(refs) if fetch else refs)

    def close(self, run: PassRun) -> None:
        self.close_sid(run.sid)

    def close_sid(self, sid: str) -> None:
        self.host.held.pop(sid, None)
        for p in self.peers:
            p.close_session.remote(sid)

    def each(self, step: Callable[..., Any], *args, fetch: bool = True) -> list:
        refs = [p.call.remote(step, *args) for p in self.peers]
        own = step(self.host, *args)
        return [own] + (peer_get(refs) if refs and fetch else refs)


def make_replica(host: ShardHost, peers: Sequence = ()) -> Replica:
    """The replica ``host`` heads: pipelined over ``peers`` when it has any, else local."""
    return PipelinedReplica(host, peers) if peers else LocalReplica(host)
