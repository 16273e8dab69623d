"""The worker actor: a thin shell over one shard's host, its replica and its peer side.

:class:`ReplicaActor` is a plain class, testable without Ray; :func:`remote_worker` starts
it as a Ray actor. It holds three pieces and forwards calls to them:

    host     :class:`~ray_influence.shard_host.ShardHost`: the shard's models, data, stored queries
    replica  :class:`~ray_influence.replica.Replica` it heads (shard 0; local when unsharded):
             the driver's tasks run on it (:mod:`ray_influence.corpus_pass`,
             :mod:`ray_influence.query_stage`, :mod:`ray_influence.score_stage`)
    peer     :class:`~ray_influence.peer.PeerShard`: the passes its head runs on it (shards 1..S-1)

Large arrays never go back to the driver: partial statistics are returned as Ray objects
that the reducer tasks consume by reference, and pieces are written straight to the run
directory.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from . import corpus_pass, ekfac, faults, query_stage, score_stage, shard_steps
from .config import Config
from .corpus_sinks import CorpusSink, IndexSink
from .data import Document, Partition
from .pass_spec import PassKind, PassSpec
from .peer import PeerShard
from .pipeline import Step
from .replica import make_replica
from .shard_host import ShardHost
from .tokens import Example

CRASH_ONCE_ENV, CRASH_PEER_ONCE_ENV = faults.CRASH_ONCE_ENV, faults.CRASH_PEER_ONCE_ENV  # for the tests


class ReplicaActor:
    """One worker process: shard ``shard`` of a replica (the whole model when unsharded).

    Args:
        cfg: the job config.
        shard: this worker's shard number (0 when ``cluster.shards`` is 1).
        layout: ``(blocks, first, last)`` of this shard; None for a whole model.
        peers: shard 0 of a sharded replica: the actor handles of shards 1..S-1, in order
            (constructor arguments, so a restarted head knows them again).
    """

    def __init__(self, cfg: Config, shard: int = 0, layout: tuple[range, bool, bool] | None = None,
                 peers: Sequence = ()):
        for p in peers:  # a restarted head: passes its previous life left open are void
            p.close_all_sessions.remote()
        self.host = ShardHost(cfg, shard, layout)
        self.replica = make_replica(self.host, peers)
        self.peer = PeerShard(self.host)

    # ------------------------------------------------------- the shard's data

    @property
    def run(self):
        return self.host.run

    def stats(self) -> dict:
        return self.host.stats()

    def model(self, stage: str):
        return self.host.model(stage)

    def specs(self, stage: str):
        return self.host.specs(stage)

    def module_names(self, stage: str = "pretrained") -> list[str]:
        return self.host.module_names(stage)

    def corpus_documents(self, part: Partition, drop: dict[int, str] | None = None) -> tuple[list[Document], list]:
        return self.host.corpus_documents(part, drop)

    def corpus_examples(self, docs: Sequence[Document]) -> list[Example]:
        return self.host.corpus_examples(docs)

    def finetune_records(self) -> list[dict]:
        return self.host.finetune_records()

    def verify_pieces(self, rels: Sequence[str]) -> list[str]:
        """The damaged pieces among ``rels``, dropped (:func:`shard_steps.verify_pieces`)."""
        return shard_steps.verify_pieces(self.host, rels)

    # ------------------------------------------------------------------- fit

    def fit_pass(self, spec: PassSpec, share: Sequence) -> list:
        """Partial sums of a covariance or Λ pass over this replica's share of the factor sample.

        Returns:
            per shard, a Ray object ref of ``{module: CovarianceStats or LambdaStats}``
            (``{module: None}`` each for an empty share).
        """
        import ray

        return [r if isinstance(r, ray.ObjectRef) else ray.put(r) for r in self._fit(spec, share, fetch=False)]

    def _fit(self, spec: PassSpec, share: Sequence, fetch: bool) -> list:
        if spec.kind not in (PassKind.COVARIANCE, PassKind.LAMBDA):
            raise ValueError(f"a fit pass is a covariance or lambda pass, not {spec.kind.value}")
        examples = self.host.share_examples(spec.stage, share)
        if not examples:
            return self.replica.each(_no_stats, spec.stage, fetch=fetch)
        return self.replica.finish(self.replica.run(spec, examples), shard_steps.collector_result, fetch=fetch)

    def covariance(self, stage: str, share: Sequence) -> dict:
        """``{module: CovarianceStats}`` of every shard's modules over this share (in one process)."""
        return _merged(self._fit(PassSpec.covariance(stage), share, fetch=True))

    def lambdas(self, stage: str, share: Sequence, bases: Sequence[dict]) -> dict:
        """``{module: LambdaStats}`` of every shard's modules; ``bases``: per shard, ``{module: Eigenbasis}``."""
        return _merged(self._fit(PassSpec.lambdas(stage, bases), share, fetch=True))

    def eigendecompose(self, stats: ekfac.CovarianceStats) -> ekfac.Eigenbasis:
        """float64 eigendecomposition of one module's merged A and G (a reducer task)."""
        return ekfac.eigenbasis(stats)

    # --------------------------------------------------------- corpus, queries

    def corpus(self, part: Partition, sink: CorpusSink, drop: dict[int, str] | None = None) -> dict:
        """The corpus pass of one partition into ``sink`` (:func:`corpus_pass.run_partition`)."""
        return corpus_pass.run_partition(self.replica, part, sink, drop)

    def index(self, part: Partition, stages: Sequence[str], drop: dict[int, str] | None = None) -> dict:
        """One partition's index pieces at each of ``stages``' models (the corpus pass into an :class:`IndexSink`)."""
        return self.corpus(part, IndexSink(tuple(stages)), drop)

    def queries(self, methods: Sequence[str]) -> dict:
        return query_stage.run_queries(self.replica, methods)

    def score(self, part: Partition, methods: Sequence[str], k: int) -> dict:
        return score_stage.score_partition(self.replica, part, methods, k)

    def partial_scores(self, part: Partition, methods: Sequence[str]):
        """This shard's partial scores of one partition's index pieces (:func:`shard_steps.piece_partial_scores`)."""
        return shard_steps.piece_partial_scores(self.host, part, methods)

    def token_terms(self, stage: str, requests: Sequence, sink: CorpusSink) -> list:
        """Per-token and per-module terms of top documents (:mod:`ray_influence.token_influence`);
        ``sink``: the corpus pass's, which knows where the documents' norms are."""
        from .token_influence import replica_token_terms

        return replica_token_terms(self.replica, stage, requests, sink)

    # ------------------------------------------------------------- peer side

    def open_session(self, sid: str, spec: PassSpec) -> None:
        self.peer.open_session(sid, spec)

    def shard_forward(self, sid: str, bid: int, batch, hidden):
        return self.peer.shard_forward(sid, bid, batch, hidden)

    def shard_backward(self, sid: str, bid: int, step: Step) -> Step:
        return self.peer.shard_backward(sid, bid, step)

    def finish(self, sid: str, step: Callable[..., Any], *args) -> Any:
        return self.peer.finish(sid, step, *args)

    def call(self, step: Callable[..., Any], *args) -> Any:
        return self.peer.call(step, *args)

    def close_session(self, sid: str) -> None:
        self.peer.close_session(sid)

    def close_all_sessions(self) -> None:
        self.peer.close_all_sessions()


def _no_stats(host: ShardHost, stage: str) -> dict:
    """An empty share's partial sums: ``{module: None}`` of this shard's modules."""
    return {n: None for n in host.specs(stage)}


def _merged(per_shard: Sequence[dict]) -> dict:
    """One dict of every shard's ``{module: value}`` (the shards' modules are disjoint)."""
    return {n: v for part in per_shard for n, v in part.items()}


def remote_worker(cfg: Config, shard: int = 0, layout: tuple[range, bool, bool] | None = None,
                  placement: tuple[Any, int] | None = None, peers: Sequence = ()):
    """Starts a :class:`ReplicaActor` as a Ray actor with the config's resources.

    Args:
        layout: the shard's ``(blocks, first, last)``; None for a whole model.
        placement: ``(placement group, bundle index)`` to schedule the actor in.
        peers: for shard 0 of a sharded replica, the other shards' actors.
    """
    import ray

    c = cfg.cluster
    env = {k: os.environ[k] for k in faults.ENVS if k in os.environ}
    options: dict[str, Any] = {}
    if placement is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement[0], placement_group_bundle_index=placement[1])
    actor_cls = ray.remote(ReplicaActor).options(
        num_cpus=c.num_cpus_per_worker, num_gpus=c.num_gpus_per_worker,
        max_restarts=c.max_restarts, max_task_retries=c.max_restarts,
        **({"runtime_env": {"env_vars": env}} if env else {}), **options,
    )
    return actor_cls.remote(cfg, shard, layout, list(peers))
