"""The corpus pass of one partition on one replica: index it, or score it on the spot.

``scoring.mode`` picks what becomes of a partition's document gradients:

    index   projected rows, written as index pieces (:func:`index_partition`)
    fused   projected rows, rounded as an index piece stores them and scored in memory
            against the projected queries (:func:`fused_partition`)
    exact   exact gradients contracted with the low-rank query factors (:func:`exact_partition`)

Sharded, every shard keeps its own modules' columns (:mod:`ray_influence.shard_steps`)
and the head adds the partial scores. Every mode writes the partition's documents and
skipped rows; fused and exact keep each partition's top-k under ``fused/<token>/``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch

from . import faults, shard_steps as steps
from .data import Partition
from .pass_spec import PassSpec
from .replica import Replica, peer_get
from .score_stage import query_sqnorms, sum_partials, top_k_of
from .scoring import Method
from .store import write_docs_piece, write_fused_piece, write_skipped_piece


def partition_provenance(part: Partition, drop: dict[int, str] | None) -> dict:
    """What an index piece of ``part`` was computed from: the file's fingerprint, dropped rows."""
    return {"fingerprint": part.file.fingerprint, "dropped": sorted(int(r) for r in (drop or {}))}


@dataclasses.dataclass
class PartitionRows:
    """One partition's documents and which of them the pass kept.

    Attributes:
        docs: the partition's readable documents; ``examples`` their tokens, in order.
        skipped: ``(doc_id, reason)`` of the rows not kept.
        keep: ``[len(docs)]`` bool, the documents with a finite gradient on every shard.
        held: ``{stage: key}`` under which every shard holds its flat projected rows
            ``[len(docs), width]`` (rows not kept are junk); none for an empty partition.
    """

    docs: list
    examples: list
    skipped: list
    keep: torch.Tensor
    held: dict

    @property
    def kept_rows(self) -> list[int]:
        return self.keep.nonzero(as_tuple=True)[0].tolist()

    @property
    def kept_docs(self) -> list:
        return [self.docs[i] for i in self.kept_rows]

    @property
    def file_rows(self) -> torch.Tensor:
        """``[N]`` rows within the file of the kept documents."""
        return torch.tensor([d.row for d in self.kept_docs], dtype=torch.int64)


def _read(replica: Replica, part: Partition, drop: dict[int, str] | None) -> tuple[list, list, list]:
    faults.inject("corpus_task")
    docs, skipped = replica.host.corpus_documents(part, drop)
    return docs, replica.host.corpus_examples(docs), skipped


def projected_rows(replica: Replica, part: Partition, stages: Sequence[str],
                   drop: dict[int, str] | None) -> PartitionRows:
    """One partition's projected gradients at each of ``stages``' models, held on every shard.

    A document is kept only when its gradient is finite on every shard.
    """
    docs, examples, skipped = _read(replica, part, drop)
    keep = torch.ones(len(docs), dtype=torch.bool)
    held = {}
    try:
        for stage in stages:
            if not examples:
                continue
            run = replica.run(PassSpec.gradients(stage, projected=True), examples)
            held[stage] = run.sid
            for mask in replica.finish(run, steps.hold_index_rows, run.sid, run.rows(examples), len(docs),
                                       run.order(examples)):
                keep &= mask
    except BaseException:
        for key in held.values():
            replica.host.held.pop(key, None)
        raise
    skipped += [(docs[j].doc_id, "non_finite_gradient") for j in (~keep).nonzero(as_tuple=True)[0].tolist()]
    return PartitionRows(docs, examples, skipped, keep, held)


def finish_partition(replica: Replica, part: Partition, rows: PartitionRows, t0: float) -> dict:
    """Writes the partition's documents and skipped rows; its counts for the driver."""
    run, kept = replica.host.run, rows.kept_rows
    write_docs_piece(run, part, rows.kept_docs, [rows.examples[i] for i in kept],
                     replica.host.cfg.scoring.doc_text_chars)
    write_skipped_piece(run, part, rows.skipped)
    return {
        "partition": part.key,
        "docs": len(kept),
        "skipped": len(rows.skipped),
        "tokens": sum(len(rows.examples[i]) for i in kept),
        "truncated": sum(rows.examples[i].truncated for i in kept),
        "seconds": time.perf_counter() - t0,
    }


def index_partition(replica: Replica, part: Partition, stages: Sequence[str],
                    drop: dict[int, str] | None = None) -> dict:
    """Projected gradients of one partition at each of ``stages``' models, written as index pieces.

    Every shard writes its own modules' columns.

    Args:
        drop: rows within the file to skip (duplicate ids), with their reason.
    """
    t0 = time.perf_counter()
    rows = projected_rows(replica, part, stages, drop)
    prov = partition_provenance(part, drop)
    stubs = [dataclasses.replace(d, text="") for d in rows.kept_docs]  # a piece keeps ids and rows
    pending = []
    for stage in stages:
        if stage in rows.held:
            pending += replica.each(steps.write_held_index, rows.held[stage], stage, part, stubs, rows.keep, prov,
                                    fetch=False)[1:]
        else:  # an empty partition: every shard writes its empty piece
            pending += replica.each(steps.write_empty_index, stage, part, prov, fetch=False)[1:]
    if pending:
        peer_get(pending)
    return finish_partition(replica, part, rows, t0)


def fused_partition(replica: Replica, part: Partition, stages: Sequence[str], drop: dict[int, str] | None,
                    methods: Sequence[str], k: int, token: str) -> dict:
    """The corpus pass of one partition scored on the spot: its top-k per method, no index.

    The projected gradients are rounded to ``projection.dtype`` and scored as the score
    stage scores an index piece, so the results are those of index + score. The top-k
    is also written under ``fused/<token>/`` (``token``: the query set, methods and k),
    so a rerun over the same queries skips the partition.

    Returns:
        the counts of :func:`index_partition`, plus ``top_k``: ``{method: (values [Q, k'], global positions [Q, k'])}``.
    """
    t0 = time.perf_counter()
    rows = projected_rows(replica, part, stages, drop)
    file_rows = rows.file_rows
    per_shard = replica.each(steps.held_partial_scores, rows.held, list(stages), rows.keep, file_rows, list(methods))
    partial = sum_partials(part, per_shard)
    top = top_k_of(part, partial, file_rows, k)
    offset = part.offset - part.start
    sqnorms = {Method.parse(m).doc_model: sq for m, (_, sq, _) in partial.items()}
    write_fused_piece(replica.host.run, token, part, {m: (v, p - offset) for m, (v, p) in top.items()}, sqnorms,
                      file_rows, partition_provenance(part, drop))
    return {**finish_partition(replica, part, rows, t0), "top_k": top}


def exact_partition(replica: Replica, part: Partition, stages: Sequence[str], drop: dict[int, str] | None,
                    methods: Sequence[str], k: int, token: str) -> dict:
    """The exact pass of one partition (``scoring.mode: exact``): its top-k per method, no index.

    Each document's exact gradient at each of ``stages``' models is contracted with the
    low-rank query factors of the methods scored against that model
    (:class:`~ray_influence.collectors.QueryScoreCollector`); every shard scores its own
    modules and the head adds the partial scores. The top-k and the documents' ``‖DW‖²``
    go under ``fused/<token>/`` as in :func:`fused_partition`.
    """
    t0 = time.perf_counter()
    docs, examples, skipped = _read(replica, part, drop)
    host, n = replica.host, len(docs)
    keep = torch.ones(n, dtype=torch.bool)
    by_stage: dict[str, list[str]] = {}
    for m in methods:
        by_stage.setdefault(Method.parse(m).doc_model, []).append(Method.parse(m).value)
    scored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for stage in stages:
        ms = by_stage.get(stage, [])
        n_q = sum(host.queries.count(m) for m in ms)
        s, sq = torch.zeros(n, n_q, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        if examples and ms:
            run = replica.run(PassSpec.scores(stage, ms), examples)
            rows = run.rows(examples)
            parts = replica.finish(run, steps.exact_rows, rows, n, run.order(examples))
            s, sq = (sum(p[0] for p in parts), sum(p[1] for p in parts))
            got = torch.zeros(n, dtype=torch.bool)
            got[rows] = True
            keep &= got & torch.isfinite(s).all(dim=1) & torch.isfinite(sq)
        scored[stage] = (s, sq)
    skipped += [(docs[j].doc_id, "non_finite_gradient") for j in (~keep).nonzero(as_tuple=True)[0].tolist()]
    rows = PartitionRows(docs, examples, skipped, keep, {})
    file_rows = rows.file_rows
    partial = {}
    qsq = query_sqnorms(replica)  # summed over shards: one round trip per partition, not per method
    for stage, ms in by_stage.items():
        s, sq = scored[stage]
        start = 0
        for m in ms:
            width = host.queries.count(m)
            partial[m] = (s[keep, start:start + width].T.contiguous(), sq[keep],
                          torch.tensor(qsq[m], dtype=torch.float64))
            start += width
    partial = {Method.parse(m).value: partial[Method.parse(m).value] for m in methods}
    top = top_k_of(part, partial, file_rows, k)
    offset = part.offset - part.start
    sqnorms = {stage: scored[stage][1][keep] for stage in stages}
    write_fused_piece(host.run, token, part, {m: (v, p - offset) for m, (v, p) in top.items()}, sqnorms,
                      file_rows, partition_provenance(part, drop))
    return {**finish_partition(replica, part, rows, t0), "top_k": top}
