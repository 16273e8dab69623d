"""Per-shard steps: what every shard of a replica does on its own part, head and peers alike.

Each step is a module-level function of the shard's
:class:`~ray_influence.shard_host.ShardHost`: ``step(host, *args)``, run through
:meth:`ray_influence.replica.Replica.each`, or ``step(host, shard_pass, *args)`` once a
pass ran, through :meth:`~ray_influence.replica.Replica.finish`. A peer runs it in its own
actor, so its index columns, query vectors and partial sums never pass through the head.
Arrays a step leaves for a later one wait in ``host.held``; a restarted peer has lost
them and raises :class:`~ray_influence.pipeline.ShardLost` (the driver retries).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .data import Document, Partition
from .lowrank import concat, truncate
from .models import parse_dtype
from .modules import ModuleSpec
from .peer import ShardPass
from .pipeline import ShardLost
from .projection import project_matrix
from .rundir import DamagedArtifact
from .scoring import (
    BlockScores,
    Method,
    finite_rows,
    flatten,
    index_width,
    query_vectors,
    rows_scan,
    scatter_rows,
    scatter_scores,
)
from .shard_host import ShardHost
from .store import energy_rows, read_index_piece, write_index_piece, write_query_factors, write_query_vectors

# ----------------------------------------------------------------- pieces

def verify_pieces(host: ShardHost, rels: Sequence[str]) -> list[str]:
    """Reads and checksums each piece of ``rels``; drops the damaged ones (so they are recomputed)
    and returns them. Any worker can check any shard's pieces: they share the run dir."""
    damaged = []
    for rel in rels:
        try:
            host.run.read_piece(rel)
        except DamagedArtifact:
            host.run.invalidate(rel)
            damaged.append(rel)
    return damaged


# ------------------------------------------------------------------ fit

def collector_result(host: ShardHost, done: ShardPass):
    """The pass's collector result (fit: ``{module: CovarianceStats or LambdaStats}``; terms:
    ``[M_shard, R, T]`` this shard's per-module, per-position terms)."""
    return done.plan.collector.result()


# ---------------------------------------------------------------- corpus

def hold_index_rows(host: ShardHost, done: ShardPass, key: str, rows: list[int], n_docs: int,
                    order: list[int]) -> torch.Tensor:
    """Holds this shard's flat index rows ``[n_docs, width]`` of a gradients pass under ``key``.

    Args:
        rows: the input positions the pass kept; order: collector order -> input order.

    Returns:
        ``[n_docs]`` bool: the rows finite on this shard.
    """
    flat = scatter_rows(done.plan.collector.result(), list(host.specs(done.spec.stage)), order, rows, n_docs)
    host.held[key] = flat
    return finite_rows(flat, rows)


def _take_held(host: ShardHost, key: str):
    if key not in host.held:
        raise ShardLost(f"shard {host.shard} has no index rows of pass {key} (restarted?)")
    return host.held.pop(key)


def write_held_index(host: ShardHost, key: str, stage: str, part: Partition, docs: Sequence[Document],
                     keep: torch.Tensor, provenance: dict) -> dict:
    """Writes this shard's index piece of ``stage`` from the rows held under ``key`` (rows ``keep``)."""
    flat = _take_held(host, key)
    return write_index_piece(host.run, stage, host.shard, part, docs, flat[keep],
                             parse_dtype(host.cfg.projection.dtype), provenance)


def write_empty_index(host: ShardHost, stage: str, part: Partition, provenance: dict) -> dict:
    """Writes this shard's index piece of an empty partition."""
    flat = torch.zeros(0, index_width(host.specs(stage), host.cfg.projection.dim))
    return write_index_piece(host.run, stage, host.shard, part, [], flat, parse_dtype(host.cfg.projection.dtype),
                             provenance)


def held_partial_scores(host: ShardHost, keys: dict[str, str], stages: Sequence[str], keep: torch.Tensor,
                        file_rows: torch.Tensor, methods: Sequence[str]) -> tuple[dict, torch.Tensor]:
    """This shard's partial scores of its held index rows (a fused pass; nothing is written).

    Args:
        keys: ``{stage: held key}``; a stage without one (an empty partition) has no rows.
    """
    flats = {s: _take_held(host, keys[s]) if s in keys
             else torch.zeros(len(keep), index_width(host.specs(s), host.cfg.projection.dim)) for s in stages}
    return partial_scores(host, methods, rows_scan(flats, keep, file_rows, parse_dtype(host.cfg.projection.dtype)))


def exact_rows(host: ShardHost, done: ShardPass, rows: list[int], n_docs: int,
               order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's partial exact scores ``[n_docs, Q]`` and ``‖DW‖²`` ``[n_docs]`` of a scores pass."""
    return scatter_scores(done.plan.collector.result(), order, rows, n_docs)


# ---------------------------------------------------------------- scores

Scan = Callable[[str, Callable[[torch.Tensor], None]], tuple[torch.Tensor, torch.Tensor]]
"""``scan(stage, add)`` feeds a stage's document rows block by block to ``add`` and returns
``(doc sqnorm [N], rows within the file [N])``."""


def partial_scores(host: ShardHost, methods: Sequence[str], scan: Scan) -> tuple[dict, torch.Tensor]:
    """This shard's partial scores of one partition's rows, fed stage by stage by ``scan``.

    Returns:
        ``({method: (scores [Q, N] float64, doc sqnorm [N], query sqnorm [Q])}, rows [N])``.
    """
    qv = host.queries.vectors()
    by_stage: dict[str, list[str]] = {}
    for m in methods:
        method = Method.parse(m)
        by_stage.setdefault(method.doc_model, []).append(method.value)
    out, rows = {}, None
    for stage, names in by_stage.items():
        block_scores = BlockScores({m: qv["vectors"][m] for m in names})
        sqnorm, rows = scan(stage, block_scores.add)
        out.update({m: (s, sqnorm, qv["vectors"][m].to(torch.float64).square().sum(1))
                    for m, s in block_scores.result().items()})
    order = [Method.parse(m).value for m in methods]
    return {m: out[m] for m in order}, rows  # every stage's piece holds the same rows


def piece_partial_scores(host: ShardHost, part: Partition, methods: Sequence[str]) -> tuple[dict, torch.Tensor]:
    """This shard's partial scores of one partition's index pieces (summed over shards later).

    Each index piece is streamed once (:class:`~ray_influence.store.IndexPieceReader`:
    read and checksum in a background thread, overlapped with the matmuls), however
    many methods score against it.
    """
    reader = host.piece_reader()
    return partial_scores(host, methods, lambda stage, add: reader.scan(stage, host.shard, part, add))


def index_sqnorms(host: ShardHost, stage: str, part: Partition) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's part of each document's squared index norm, and the rows."""
    _, sq, rows = read_index_piece(host.run, stage, host.shard, part)
    return sq, rows


def query_sqnorms(host: ShardHost) -> dict[str, torch.Tensor]:
    """``{method: [Q]}`` this shard's part of each query vector's squared norm (untruncated)."""
    if host.exact:
        return {m: sum(f.sqnorm for f in per.values()) for m, per in host.queries.factors()["factors"].items()}
    return {m: v.to(torch.float64).square().sum(1) for m, v in host.queries.vectors()["vectors"].items()}


def shard_specs(host: ShardHost, stage: str) -> list[ModuleSpec]:
    return list(host.specs(stage).values())


# --------------------------------------------------------------- queries

def start_query_blocks(host: ShardHost, key: str, methods: Sequence[str]) -> None:
    """Opens the query stage's blocks under ``key``: this shard's fit factors, no block yet."""
    host.held[key] = (host.fit_factors(methods), [])


def hold_query_block(host: ShardHost, done: ShardPass, key: str, order: list[int], methods: Sequence[str]) -> int:
    """Preconditions this shard's query gradients of a block and holds them under ``key``."""
    if key not in host.held:
        raise ShardLost(f"shard {host.shard} holds no query blocks {key} (restarted?)")
    fit, parts = host.held[key]
    grads = {n: g[order] for n, g in done.plan.collector.result().items()}
    parts.append(query_block_of(host, grads, methods, fit))
    return len(order)


def query_block_of(host: ShardHost, grads: dict, methods: Sequence[str], fit: dict) -> dict:
    """One block's ``{method: {module: QueryFactors}}`` (exact mode) or ``{method: [B, width]}``.

    Args:
        grads: ``{module: [B, d_out, d_in']}`` exact query gradients of this shard's modules.
        fit: :meth:`ShardHost.fit_factors`.
    """
    names = list(host.specs("finetuned"))
    projs = None if host.exact else host.projections("finetuned")
    rank = host.cfg.scoring.query_rank
    out = {}
    for m in methods:
        method = Method.parse(m)
        u = query_vectors(method, grads, fit.get("finetuned"), fit.get("pretrained"))
        if host.exact:
            out[method.value] = {n: truncate(u[n], rank) for n in names}
            continue
        if projs is not None:
            u = {n: project_matrix(u[n], projs[n]) for n in names}
        out[method.value] = flatten(u, names)
    return out


def write_query_blocks(host: ShardHost, key: str, ids: list, recs: list[dict], methods: Sequence[str]) -> list[dict]:
    """Writes the query blocks held under ``key`` (in order) as this shard's piece; exact mode:
    returns their energy rows."""
    if key not in host.held:
        raise ShardLost(f"shard {host.shard} holds no query blocks {key} (restarted?)")
    parts = host.held.pop(key)[1]
    if not host.exact:
        vectors = {m: torch.cat([p[m] for p in parts]) for m in parts[0]} if parts else {}
        check_rows(host.shard, ids, vectors.values())
        write_query_vectors(host.run, host.shard, ids, recs, host.cfg.queries, vectors)
        return []
    factors = {m: {n: concat([p[m][n] for p in parts]) for n in parts[0][m]} for m in parts[0]} if parts else {}
    check_rows(host.shard, ids, [f.sqnorm for per in factors.values() for f in per.values()])
    write_query_factors(host.run, host.shard, ids, recs, host.cfg.queries, factors, host.cfg.scoring.query_rank)
    return energy_rows(ids, factors)


def check_rows(shard: int, ids: Sequence, tensors) -> None:
    """Every held query tensor has one row per kept query (a peer restarted mid-stage has fewer)."""
    for t in tensors:
        if t.shape[0] != len(ids):
            raise ShardLost(f"shard {shard} holds {t.shape[0]} query rows for {len(ids)} queries (restarted?)")

