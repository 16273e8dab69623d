"""The job's actors on Ray: one worker per replica (or one per shard), a reducer, and the loop
that keeps them busy (:func:`drain`)."""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Sequence

import ray
from tqdm import tqdm

from .config import Config
from .pipeline import ShardLost
from .reducer import remote_reducer
from .shard_model import model_blocks, shard_layout
from .worker import remote_worker

IN_FLIGHT_PER_WORKER = 2


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def drain(workers: Sequence, items: Sequence, submit, on_done, in_flight: int = IN_FLIGHT_PER_WORKER,
          retries: int = 3) -> None:
    """Runs ``submit(worker, item)`` over ``items``, keeping each worker ``in_flight`` deep.

    A task whose actor died for good is resubmitted to another worker (its item is
    retried), so one lost worker does not lose a partition. A task that lost a shard of
    its replica (:class:`ShardLost`: Ray restarts the shard) is retried, ``retries`` times
    per item at most.
    """
    queue = list(items)[::-1]
    running: dict = {}
    alive = list(workers)
    lost: dict[int, int] = defaultdict(int)

    def feed(worker) -> None:
        if queue:
            item = queue.pop()
            running[submit(worker, item)] = (worker, item)

    for w in alive:
        for _ in range(in_flight):
            feed(w)
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        worker, item = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except ShardLost:
            lost[id(item)] += 1
            if lost[id(item)] > retries:
                raise
            queue.append(item)
            feed(worker)
            continue
        except ray.exceptions.RayActorError:
            if worker in alive:
                alive.remove(worker)
            if not alive:
                raise
            queue.append(item)
            feed(alive[0])
            continue
        on_done(item, result)
        feed(worker)


class ReplicaPool:
    """The job's actors: per replica, its worker (or its shards' actors, head first), and a reducer.

    Args:
        log: where the pool says how the replicas are laid out.
    """

    def __init__(self, cfg: Config, log=lambda msg: None):
        self.cfg = cfg
        self.log = log
        self.workers: list = []  # one per replica: its worker, or its shard 0 (the head)
        self.shard_actors: list[list] = []  # per replica, its shards' actors
        self.placement_groups: list = []
        self.reducer = None

    def start(self) -> None:
        """One worker per replica; with shards, one actor per shard in a placement group each."""
        if self.workers:
            return
        c = self.cfg.cluster
        if c.shards == 1:
            self.workers = [remote_worker(self.cfg) for _ in range(c.replicas)]
            self.shard_actors = [[w] for w in self.workers]
        else:
            layout = shard_layout(model_blocks(self.cfg.pretrained_model, self.cfg.model.trust_remote_code), c.shards)
            for _ in range(c.replicas):
                pg = self._placement_group()
                place = [(pg, s) if pg is not None else None for s in range(c.shards)]
                peers = [remote_worker(self.cfg, s, layout[s], place[s]) for s in range(1, c.shards)]
                self.shard_actors.append([remote_worker(self.cfg, 0, layout[0], place[0], peers)] + peers)
            self.workers = [a[0] for a in self.shard_actors]
            self.log(f"shards: {c.replicas} replica(s) x {c.shards} shards, blocks "
                     + ", ".join(f"[{r.start}, {r.stop})" for r, _, _ in layout))
        self.reducer = remote_reducer(self.cfg)

    def _placement_group(self):
        """A placement group holding one replica's shards (PACK: on one node when they fit)."""
        from ray.util.placement_group import placement_group

        c = self.cfg.cluster
        bundle = {k: v for k, v in (("CPU", c.num_cpus_per_worker), ("GPU", c.num_gpus_per_worker)) if v > 0}
        if not bundle:
            return None
        pg = placement_group([bundle] * c.shards, strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=c.placement_timeout_s)
        if not ready:
            ray.util.remove_placement_group(pg)
            raise RuntimeError(
                f"the cluster could not place a replica's {c.shards} shards of {bundle} each within "
                f"{c.placement_timeout_s:.0f}s (cluster resources: {ray.cluster_resources()}); lower "
                "cluster.replicas, cluster.shards or the per-worker resources")
        self.placement_groups.append(pg)
        return pg

    def all_actors(self) -> list:
        return [a for actors in self.shard_actors for a in actors]

    def stop(self) -> list[dict] | None:
        """Stops every actor; returns each worker's stats (None when a worker could not answer)."""
        stats = None
        try:  # peak memory and parameter bytes per worker, for the summary
            stats = ray.get([w.stats.remote() for w in self.all_actors()], timeout=30)
        except Exception:  # noqa: BLE001 - a dead worker must not hide the job's own outcome
            pass
        for w in self.all_actors() + ([self.reducer] if self.reducer is not None else []):
            ray.kill(w)
        for pg in self.placement_groups:
            ray.util.remove_placement_group(pg)
        self.workers, self.shard_actors, self.placement_groups, self.reducer = [], [], [], None
        return stats
