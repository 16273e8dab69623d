"""Scores on one replica: the score stage's partitions, and the norms and terms that explain them.

A replica's shards each hold part of every index row and query vector (their own
modules' columns), so a score is the sum of the shards' partial scores
(:func:`sum_partials`), and so is a squared norm.
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import torch

from . import shard_steps as steps
from .data import Partition
from .pass_spec import PassSpec
from .replica import Replica
from .scoring import Method, top_k
from .tokens import Example


def sum_partials(part: Partition, per_shard: Sequence[tuple[dict, torch.Tensor]]) -> dict:
    """The shards' partial scores and squared norms, added up in shard order.

    Args:
        per_shard: per shard, ``({method: (scores [Q, N], doc sqnorm [N], query sqnorm [Q])}, rows [N])``.
    """
    partial, rows = per_shard[0]
    for other, other_rows in per_shard[1:]:
        if not torch.equal(other_rows, rows):
            raise RuntimeError(f"partition {part.key}: the shards' index pieces hold different rows")
        partial = {m: tuple(a + b for a, b in zip(partial[m], other[m])) for m in partial}
    return partial


def top_k_of(part: Partition, partial: dict, rows: torch.Tensor, k: int) -> dict:
    """The top-k per method of a partition's scores; cosine scores divide by the query's and document's norms.

    Returns:
        ``{method: (values [Q, k'], global positions [Q, k'])}``.
    """
    positions = rows + (part.offset - part.start)  # this run's global positions
    out = {}
    for m, (s, sqnorm, qsq) in partial.items():
        if Method.parse(m).cosine:
            s = s / (qsq.sqrt()[:, None] * sqnorm.sqrt()[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
        out[m] = top_k(s, k, positions)
    return out


def score_partition(replica: Replica, part: Partition, methods: Sequence[str], k: int) -> dict:
    """Top-k of one partition's index pieces per method: ``{method: (values [Q, k'], global positions [Q, k'])}``."""
    per_shard = replica.each(steps.piece_partial_scores, part, list(methods))
    return top_k_of(part, sum_partials(part, per_shard), per_shard[0][1], k)


def query_sqnorms(replica: Replica) -> dict[str, list[float]]:
    """``{method: [Q]}`` squared norms of the stored query vectors, summed over shards."""
    per_shard = replica.each(steps.query_sqnorms)
    return {m: functools.reduce(operator.add, (sq[m] for sq in per_shard)).tolist() for m in per_shard[0]}


def module_table(replica: Replica, stage: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Names and decoder blocks of the replica's tracked modules (every shard's, in order)."""
    specs = [s for shard in replica.each(steps.shard_specs, stage) for s in shard]
    return tuple(s.name for s in specs), tuple(s.block for s in specs)


def example_terms(replica: Replica, stage: str, example: Example, pairs: Sequence) -> torch.Tensor | None:
    """``[M, R, T]`` per-module, per-position terms of one document for the (method, query) pairs.

    None when its forward is not finite. The modules of every shard, in order.
    """
    run = replica.run(PassSpec.terms(stage, pairs), [example])
    if run.skipped:
        replica.close(run)
        return None
    return torch.cat(replica.finish(run, steps.collector_result))
