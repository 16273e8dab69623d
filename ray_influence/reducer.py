"""The reducer: merges workers' partial sums per module and fits the factors.

Plain functions, run by one small Ray actor (:func:`remote_reducer`); their arguments
arrive as Ray object references that Ray resolves in the actor, so partial sums go from
worker to reducer without passing through the driver. The eigendecompositions run as
one task per module on the worker actors (:meth:`ray_influence.worker.ReplicaActor.eigendecompose`),
which are warm processes already: zero-CPU tasks would make Ray start (and import torch
in) a new process for each.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import ekfac
from .factors_io import factors_to_bytes
from .rundir import RunDir
from .store import factors_rel
from .scoring import top_k


def _present(parts: Sequence[dict | None], name: str) -> list:
    return [p[name] for p in parts if p is not None and p.get(name) is not None]


def merge_per_module(names: Sequence[str], *parts: dict) -> tuple:
    """Sums ``{name: stats}`` partials from every worker; one merged stats object per module."""
    merged = tuple(ekfac.sum_stats(_present(parts, n)) for n in names)
    return merged if len(merged) != 1 else merged[0]


def save_stage_factors(run_dir: str, stage: str, shard: int, names: Sequence[str], damping: Any,
                       meta: dict, *refs: Any) -> dict:
    """Assembles and writes one stage's factors.

    ``refs`` are, for each module in order, its eigenbasis, then every module's covariance
    stats, then every module's Λ stats (3 x len(names) values).
    """
    n = len(names)
    bases, covs, lams = refs[:n], refs[n : 2 * n], refs[2 * n :]
    factors = {name: ekfac.module_factors(b, c, l, damping) for name, b, c, l in zip(names, bases, covs, lams)}
    run = RunDir(run_dir)
    marker = run.write_piece(factors_rel(stage, shard), factors_to_bytes(factors, {**meta, "stage": stage, "shard": shard}))
    return {
        "stage": stage,
        "modules": n,
        "tokens": covs[0].n_tokens,
        "docs": lams[0].n_docs,
        "damping": {name: f.damping for name, f in factors.items()},
        "sha256": marker["sha256"],
    }


def merge_topk(k: int, *parts: dict) -> dict:
    """Merges per-partition ``{method: (values [Q, k], positions [Q, k])}`` into the global top-k."""
    out = {}
    for method in parts[0]:
        values = torch.cat([p[method][0] for p in parts], dim=1)
        positions = torch.cat([p[method][1] for p in parts], dim=1)
        out[method] = top_k(values, k, positions)
    return out


class Reducer:
    """The reducer actor's methods: merging and saving."""

    def merge(self, names: Sequence[str], *parts: dict) -> tuple:
        return merge_per_module(names, *parts)

    def save(self, *args: Any) -> dict:
        return save_stage_factors(*args)


def remote_reducer(cfg):
    """Starts the reducer actor (``cluster.num_cpus_per_reducer`` CPUs, 0 by default)."""
    import ray

    return ray.remote(Reducer).options(num_cpus=cfg.cluster.num_cpus_per_reducer).remote()
