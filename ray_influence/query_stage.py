"""The query stage on one replica: query gradients at θ_ft, preconditioned per method, then
cut to rank-r factors (exact mode) or projected, and written to the run dir."""

from __future__ import annotations

import uuid
from typing import Any, Sequence

from . import shard_steps as steps
from .lowrank import query_block_size
from .pass_spec import PassSpec
from .query_input import finite_queries, load_queries, skipped_summary, write_skipped_queries
from .replica import Replica
from .scoring import Method
from .store import write_query_energy


def query_block(replica: Replica, n_queries: int, n_methods: int) -> int:
    """Queries per block of the query stage (``scoring.query_block``, or from the memory budget)."""
    cfg = replica.host.cfg
    if cfg.scoring.query_block:
        return cfg.scoring.query_block
    params = sum(s.d_out * s.d_in_aug for s in replica.host.specs("finetuned").values())
    return query_block_size(n_queries, params, n_methods)


def run_queries(replica: Replica, methods: Sequence[str]) -> dict:
    """Query gradients at θ_ft, preconditioned per method, cut to rank-r factors (exact mode)
    or projected; written to the run dir. Returns the stage's summary.

    The queries run in blocks of ``scoring.query_block`` (0: as many as fit in
    :data:`~ray_influence.lowrank.QUERY_STAGE_BYTES`, :func:`~ray_influence.lowrank.query_block_size`):
    a block's exact gradients and full preconditioned vectors live only until its factors
    (or projected rows) are taken, so the stage's memory is one block's plus the factors.
    Every shard preconditions, cuts and writes its own modules' queries.
    """
    host, methods = replica.host, list(methods)
    selection = load_queries(host.cfg.queries, host.tokenizer("finetuned"))  # kept queries, file order
    examples = list(selection.examples)
    block = query_block(replica, len(examples), len(methods))
    key = uuid.uuid4().hex  # names the blocks each shard holds until the write
    replica.each(steps.start_query_blocks, key, methods)
    n_blocks, skipped = 0, []
    for start in range(0, len(examples), block):
        chunk = examples[start:start + block]
        run = replica.run(PassSpec.gradients("finetuned", projected=False), chunk)
        replica.finish(run, steps.hold_query_block, key, run.order(chunk), methods)
        skipped += run.skipped
        n_blocks += 1
    if skipped:  # a non-finite loss: skipped and listed too (every shard gets only the kept ids and records)
        selection = finite_queries(selection, skipped)
    recs, ids = list(selection.records), selection.ids
    energy = [row for rows in replica.each(steps.write_query_blocks, key, ids, recs, methods) for row in rows]
    write_skipped_queries(host.run, selection.skipped)
    out = {"queries": len(ids), "methods": [Method.parse(m).value for m in methods], "query_blocks": n_blocks,
           **skipped_summary(selection)}
    if host.exact:
        write_query_energy(host.run, energy)
        out.update(rank_summary(energy, host.cfg.scoring.query_rank))
    return out


def rank_summary(energy: Sequence[dict], rank: int) -> dict:
    """The query stage's summary of the low-rank factors: the rank, the modules it was clipped on,
    and per method the smallest and mean share of ``‖u‖²`` a query keeps (over every module)."""
    clipped = sorted({(r["module"], r["rank"]) for r in energy if rank and r["rank"] < rank})
    per: dict[tuple[str, Any], list[float]] = {}
    for r in energy:
        kept_total = per.setdefault((r["method"], r["query_id"]), [0.0, 0.0])
        kept_total[0] += r["retained_energy"] * r["energy"]
        kept_total[1] += r["energy"]
    by_method: dict[str, list[float]] = {}
    for (m, _), (kept, total) in per.items():
        by_method.setdefault(m, []).append(kept / total if total > 0 else 1.0)
    return {"query_rank": rank,
            "rank_clipped": [f"{n}: {r}" for n, r in clipped],
            "retained_energy": {m: {"min": round(min(v), 6), "mean": round(sum(v) / len(v), 6)}
                                for m, v in by_method.items()}}
