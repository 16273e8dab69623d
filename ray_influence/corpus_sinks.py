"""Where the corpus pass's rows go: an index sink, or a score sink (fused or exact).

The corpus pass of a partition (:func:`ray_influence.corpus_pass.run_partition`) is one
loop for every ``scoring.mode``: read the partition, run at each stage the pass its sink
asks for (:meth:`CorpusSink.spec`), hand each pass's rows to the sink (:meth:`CorpusSink.take`),
then let the sink write what it keeps (:meth:`CorpusSink.write`). A sink also knows how a
rerun finds the partition done (:meth:`CorpusSink.pieces`, :meth:`CorpusSink.resumed`) and
where a document's squared norm lives (:meth:`CorpusSink.doc_sqnorms`, for token influence).

    IndexSink        projected rows, written as index pieces (``scoring.mode: index``)
    FusedScoreSink   projected rows rounded as a piece stores them, scored in memory against
                     the projected queries (``fused``)
    ExactScoreSink   exact gradients contracted with the low-rank query factors (``exact``)

A score sink keeps each partition's top-k under ``fused/<token>/`` (``token``: the query
set, methods, k and mode), so a rerun over the same queries skips the partition. Sinks
are small frozen values: the driver makes one per stage and sends it with each task.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import torch

from . import shard_steps as steps
from .data import Partition
from .pass_spec import PassSpec
from .replica import PassRun, Replica, peer_get
from .rundir import RunDir
from .score_stage import query_sqnorms, sum_partials, top_k_of
from .scoring import Method
from .store import (
    docs_rel,
    fused_from_bytes,
    fused_rel,
    index_rel,
    read_fused_piece,
    skipped_rel,
    write_fused_piece,
)

if TYPE_CHECKING:
    from .corpus_pass import PartitionRows


def partition_provenance(part: Partition, drop: dict[int, str] | None) -> dict:
    """What a corpus piece of ``part`` was computed from: the file's fingerprint, dropped rows."""
    return {"fingerprint": part.file.fingerprint, "dropped": sorted(int(r) for r in (drop or {}))}


@dataclasses.dataclass(frozen=True)
class CorpusSink:
    """What the corpus pass of a partition feeds (a base: see the subclasses).

    Attributes:
        stages: the models whose document gradients the pass takes, in order.
    """

    stages: tuple[str, ...]

    def spec(self, stage: str) -> PassSpec | None:
        """The pass to run at ``stage`` (None: none)."""
        raise NotImplementedError

    def take(self, replica: Replica, stage: str, run: PassRun, examples: Sequence, n_docs: int,
             ) -> tuple[torch.Tensor, Any]:
        """Takes a pass's rows: ``([n_docs] bool finite on every shard, what :meth:`write` gets)``."""
        raise NotImplementedError

    def release(self, replica: Replica, taken: dict[str, Any]) -> None:
        """Drops what :meth:`take` left on the shards (the partition failed)."""

    def write(self, replica: Replica, part: Partition, rows: "PartitionRows", taken: dict[str, Any],
              drop: dict[int, str] | None) -> dict:
        """Writes what the sink keeps of a partition; returns what the driver gets besides the counts."""
        raise NotImplementedError

    def pieces(self, part: Partition, shards: int) -> list[tuple[str, bool]]:
        """``(piece, whether its marker must match the corpus's provenance)`` of a done partition."""
        return [(docs_rel(part.key), False), (skipped_rel(part.key), False)]

    def resumed(self, run: RunDir, part: Partition) -> dict | None:
        """What the driver gets of a partition done before (its pieces checked); None: recompute it."""
        return {}

    def doc_sqnorms(self, replica: Replica, stage: str, part: Partition) -> dict[int, float]:
        """``{row: squared norm}`` of a partition's documents at ``stage``, summed over shards."""
        raise NotImplementedError


class ProjectedRows:
    """Mixed into the sinks of projected rows: every shard holds its flat rows under the pass's session id."""

    def spec(self, stage: str) -> PassSpec:
        return PassSpec.gradients(stage, projected=True)

    def take(self, replica, stage, run, examples, n_docs):
        keep = torch.ones(n_docs, dtype=torch.bool)
        for mask in replica.finish(run, steps.hold_index_rows, run.sid, run.rows(examples), n_docs,
                                   run.order(examples)):
            keep &= mask
        return keep, run.sid

    def release(self, replica, taken):
        for key in taken.values():
            replica.host.held.pop(key, None)


@dataclasses.dataclass(frozen=True)
class IndexSink(ProjectedRows, CorpusSink):
    """Projected rows, written as index pieces; every shard writes its own modules' columns."""

    def write(self, replica, part, rows, taken, drop):
        prov = partition_provenance(part, drop)
        stubs = [dataclasses.replace(d, text="") for d in rows.kept_docs]  # a piece keeps ids and rows
        pending = []
        for stage in self.stages:
            if stage in taken:
                pending += replica.each(steps.write_held_index, taken[stage], stage, part, stubs, rows.keep, prov,
                                        fetch=False)[1:]
            else:  # an empty partition: every shard writes its empty piece
                pending += replica.each(steps.write_empty_index, stage, part, prov, fetch=False)[1:]
        if pending:
            peer_get(pending)
        return {}

    def pieces(self, part, shards):
        index = [(index_rel(s, shard, part.key), True) for s in self.stages for shard in range(shards)]
        return index + super().pieces(part, shards)

    def doc_sqnorms(self, replica, stage, part):
        per_shard = replica.each(steps.index_sqnorms, stage, part)
        sq = per_shard[0][0]
        for other, _ in per_shard[1:]:
            sq = sq + other
        return dict(zip(per_shard[0][1].tolist(), sq.tolist()))


@dataclasses.dataclass(frozen=True)
class ScoreSink(CorpusSink):
    """A partition scored on the spot: its top-k per method under ``fused/<token>/``, no index.

    Attributes:
        methods: the methods scored, in order; k: the top-k kept.
        token: names the query set, methods, k and mode (:meth:`ray_influence.driver.Job.fused_token`).
    """

    methods: tuple[str, ...] = ()
    k: int = 0
    token: str = ""

    def _keep_top_k(self, replica: Replica, part: Partition, partial: dict, file_rows: torch.Tensor,
                    sqnorms: dict, drop) -> dict:
        top = top_k_of(part, partial, file_rows, self.k)
        offset = part.offset - part.start
        write_fused_piece(replica.host.run, self.token, part, {m: (v, p - offset) for m, (v, p) in top.items()},
                          sqnorms, file_rows, partition_provenance(part, drop))
        return {"top_k": top}

    def pieces(self, part, shards):
        return [(fused_rel(self.token, part.key), True)] + super().pieces(part, shards)

    def resumed(self, run, part):
        """The partition's top-k, at this run's global positions."""
        top = fused_from_bytes(run.read_piece(fused_rel(self.token, part.key)))[0]
        offset = part.offset - part.start
        return {"top_k": {m: (v, r + offset) for m, (v, r) in top.items()}}

    def doc_sqnorms(self, replica, stage, part):
        _, sqnorms, rows = read_fused_piece(replica.host.run, self.token, part)
        return dict(zip(rows.tolist(), sqnorms[stage].tolist()))


@dataclasses.dataclass(frozen=True)
class FusedScoreSink(ProjectedRows, ScoreSink):
    """Projected rows rounded to ``projection.dtype`` and scored as the score stage scores an
    index piece, so the results are those of index + score."""

    def write(self, replica, part, rows, taken, drop):
        file_rows = rows.file_rows
        per_shard = replica.each(steps.held_partial_scores, taken, list(self.stages), rows.keep, file_rows,
                                 list(self.methods))
        partial = sum_partials(part, per_shard)
        sqnorms = {Method.parse(m).doc_model: sq for m, (_, sq, _) in partial.items()}
        return self._keep_top_k(replica, part, partial, file_rows, sqnorms, drop)


@dataclasses.dataclass(frozen=True)
class ExactScoreSink(ScoreSink):
    """Each document's exact gradient contracted with the low-rank query factors of the methods
    scored against that model (:class:`~ray_influence.collectors.QueryScoreCollector`); every
    shard scores its own modules and the head adds the partial scores."""

    def _methods_of(self, stage: str) -> list[str]:
        return [Method.parse(m).value for m in self.methods if Method.parse(m).doc_model == stage]

    def spec(self, stage):
        ms = self._methods_of(stage)
        return PassSpec.scores(stage, ms) if ms else None

    def take(self, replica, stage, run, examples, n_docs):
        rows = run.rows(examples)
        parts = replica.finish(run, steps.exact_rows, rows, n_docs, run.order(examples))
        s, sq = (sum(p[0] for p in parts), sum(p[1] for p in parts))
        got = torch.zeros(n_docs, dtype=torch.bool)
        got[rows] = True
        return got & torch.isfinite(s).all(dim=1) & torch.isfinite(sq), (s, sq)

    def write(self, replica, part, rows, taken, drop):
        n, keep, queries = len(rows.docs), rows.keep, replica.host.queries
        scored = {}
        for stage in self.stages:
            n_q = sum(queries.count(m) for m in self._methods_of(stage))
            scored[stage] = taken.get(stage, (torch.zeros(n, n_q, dtype=torch.float64),
                                              torch.zeros(n, dtype=torch.float64)))
        partial = {}
        qsq = query_sqnorms(replica)  # summed over shards: one round trip per partition, not per method
        for stage in dict.fromkeys(Method.parse(m).doc_model for m in self.methods):
            s, sq = scored[stage]
            start = 0
            for m in self._methods_of(stage):
                width = queries.count(m)
                partial[m] = (s[keep, start:start + width].T.contiguous(), sq[keep],
                              torch.tensor(qsq[m], dtype=torch.float64))
                start += width
        partial = {Method.parse(m).value: partial[Method.parse(m).value] for m in self.methods}
        sqnorms = {stage: scored[stage][1][keep] for stage in self.stages}
        return self._keep_top_k(replica, part, partial, rows.file_rows, sqnorms, drop)

