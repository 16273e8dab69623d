"""The corpus pass of one partition on one replica, into a sink (:mod:`ray_influence.corpus_sinks`).

``scoring.mode`` picks the sink, not the path: index pieces (index), or the partition
scored on the spot (fused, exact). Every mode writes the partition's documents and
skipped rows.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from . import faults
from .corpus_sinks import CorpusSink
from .data import Partition
from .replica import Replica
from .store import write_docs_piece, write_skipped_piece


@dataclasses.dataclass
class PartitionRows:
    """One partition's documents and which of them the pass kept.

    Attributes:
        docs: the partition's readable documents; ``examples`` their tokens, in order.
        skipped: ``(doc_id, reason)`` of the rows not kept.
        keep: ``[len(docs)]`` bool, the documents with a finite gradient on every shard.
    """

    docs: list
    examples: list
    skipped: list
    keep: torch.Tensor

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


def run_partition(replica: Replica, part: Partition, sink: CorpusSink, drop: dict[int, str] | None = None) -> dict:
    """The corpus pass of one partition into ``sink``: its counts for the driver, plus what the sink returns.

    At each of the sink's stages the pass it asks for runs over the partition's documents,
    and the sink takes its rows; a document is kept only when its rows are finite at every
    stage and on every shard. The sink then writes what it keeps, and the partition's
    documents and skipped rows are written.

    Args:
        drop: rows within the file to skip (duplicate ids), with their reason.
    """
    t0 = time.perf_counter()
    faults.inject("corpus_task")
    docs, skipped = replica.host.corpus_documents(part, drop)
    examples = replica.host.corpus_examples(docs)
    keep = torch.ones(len(docs), dtype=torch.bool)
    taken: dict = {}
    try:
        for stage in sink.stages:
            spec = sink.spec(stage)
            if examples and spec is not None:
                run = replica.run(spec, examples)
                mask, taken[stage] = sink.take(replica, stage, run, examples, len(docs))
                keep &= mask
    except BaseException:
        sink.release(replica, taken)
        raise
    skipped += [(docs[j].doc_id, "non_finite_gradient") for j in (~keep).nonzero(as_tuple=True)[0].tolist()]
    rows = PartitionRows(docs, examples, skipped, keep)
    extra = sink.write(replica, part, rows, taken, drop)
    return {**finish_partition(replica, part, rows, t0), **extra}
