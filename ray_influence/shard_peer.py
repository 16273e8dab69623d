"""The peer side of a sharded replica, and the head's calls to it.

With ``cluster.shards: S > 1`` a replica is ``S`` :class:`ray_influence.worker.Worker`
actors. Shard 0, the head, takes the driver's tasks and drives its peers: for each pass
it opens a *session* on every peer (:meth:`ShardPeer.open_session`: the peer's own
collector over its own modules), pushes micro-batches through them
(:func:`ray_influence.pipeline.pipelined_batches` calls ``shard_forward`` and
``shard_backward``), and then asks each peer to finish in place: return its partial sums
(fit), write its index piece or its query vectors, or return its partial scores. So a
peer's large arrays never pass through the head.

A peer that died and was restarted by Ray has lost its sessions: it raises
:class:`ray_influence.pipeline.ShardLost`, and the driver retries the task.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import faults
from .attribution import FISHER_LABEL_STREAM
from .data import Document, Partition
from .modules import ModuleSpec
from .models import parse_dtype
from .pipeline import ShardLost, ShardSession, Step
from .scoring import finite_rows, index_width, rows_scan, scatter_rows, scatter_scores
from .store import read_index_piece, write_index_piece



CORPUS_PASS_KINDS = ("gradients", "scores")
"""Pass kinds of the corpus pass (index, fused, exact), where the peer fault point sits."""


class ShardPeer:
    """Mixed into :class:`ray_influence.worker.Worker`: sessions, and the head's peer calls.

    Uses the worker's ``cfg``, ``shard``, ``peers``, ``run``, ``model``, ``specs``,
    ``_plan``, ``_query_vectors`` and its ``_sessions`` / ``_held`` dicts.
    """

    @staticmethod
    def _peer_get(refs):
        """``ray.get`` of peer results; a dead peer becomes :class:`ShardLost` (the task is retried)."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as err:
            raise ShardLost(f"a shard of this replica died: {err}") from None

    def _peer_results(self, method: str, sid: str, *args) -> list:
        """``peer.<method>(sid, *args)`` on every peer, as Ray object refs."""
        return [getattr(p, method).remote(sid, *args) for p in self.peers]

    def open_session(self, sid: str, stage: str, kind: str, *args) -> None:
        """Peer shard: opens pass ``sid`` with this shard's own collector (see :meth:`_plan`)."""
        plan = self._plan(stage, kind, *args)
        self._sessions[sid] = (self._session_for(stage, plan), plan, kind)

    def _session_for(self, stage: str, plan) -> ShardSession:
        """This shard's :class:`ShardSession` of one pass into ``plan`` (head and peers alike)."""
        return ShardSession(self.model(stage), self.specs(stage), plan.collector, plan.labels, self.cfg.ekfac.seed,
                            FISHER_LABEL_STREAM, plan.on_batch)

    def _session(self, sid: str) -> tuple:
        if sid not in self._sessions:  # this actor restarted: the pass must start over
            raise ShardLost(f"shard {self.shard} has no pass {sid} (restarted?)")
        return self._sessions[sid]

    def shard_forward(self, sid: str, bid: int, batch, hidden: torch.Tensor):
        session, _, kind = self._session(sid)
        if kind in CORPUS_PASS_KINDS:
            faults.inject("peer_forward")
        return session.forward(bid, batch, hidden)

    def shard_backward(self, sid: str, bid: int, step: Step) -> Step:
        return self._session(sid)[0].backward(bid, step)

    def close_session(self, sid: str) -> None:
        self._sessions.pop(sid, None)
        self._held.pop(sid, None)

    def close_all_sessions(self) -> None:
        self._sessions.clear()
        self._held.clear()

    def _pop_session(self, sid: str) -> tuple:
        out = self._session(sid)
        del self._sessions[sid]
        return out

    def session_result(self, sid: str):
        """Peer shard: the collector's result of pass ``sid`` (the session is closed)."""
        return self._pop_session(sid)[1].collector.result()

    def index_rows(self, sid: str, rows: list[int], n_docs: int, order: list[int]) -> torch.Tensor:
        """Peer shard: builds its flat index rows of pass ``sid``; returns which are finite ``[n_docs]``."""
        session, plan, _ = self._pop_session(sid)
        flat = scatter_rows(plan.collector.result(), list(session.specs), order, rows, n_docs)
        self._held[sid] = flat
        return finite_rows(flat, rows)

    def write_index(self, sid: str, stage: str, part: Partition, docs: Sequence[Document], keep: torch.Tensor,
                    provenance: dict) -> dict:
        """Peer shard: writes its index piece of pass ``sid`` (rows ``keep``)."""
        if sid not in self._held:
            raise ShardLost(f"shard {self.shard} has no index rows of pass {sid} (restarted?)")
        flat = self._held.pop(sid)
        return write_index_piece(self.run, stage, self.shard, part, docs, flat[keep],
                                 parse_dtype(self.cfg.projection.dtype), provenance)

    def held_partial_scores(self, sids: dict[str, str], keep: torch.Tensor, file_rows: torch.Tensor,
                            methods: list[str]) -> tuple[dict, torch.Tensor]:
        """Peer shard: partial scores of its held index rows (a fused pass; nothing is written)."""
        missing = [sid for sid in sids.values() if sid not in self._held]
        if missing:
            raise ShardLost(f"shard {self.shard} has no index rows of pass {missing[0]} (restarted?)")
        flats = {stage: self._held.pop(sid) for stage, sid in sids.items()}
        return self._partial_scores(methods, rows_scan(flats, keep, file_rows, parse_dtype(self.cfg.projection.dtype)))

    def write_empty_index(self, stage: str, part: Partition, provenance: dict) -> dict:
        flat = torch.zeros(0, index_width(self.specs(stage), self.cfg.projection.dim))
        return write_index_piece(self.run, stage, self.shard, part, [], flat, parse_dtype(self.cfg.projection.dtype),
                                 provenance)

    def query_block(self, sid: str, key: str, order: list[int], methods: list[str]) -> int:
        """Peer shard: preconditions its query gradients of pass ``sid`` and holds the block under ``key``."""
        plan = self._pop_session(sid)[1]
        fit, parts = self._held.setdefault(key, (self._fit_factors(methods), []))
        parts.append(self._query_block_of({n: g[order] for n, g in plan.collector.result().items()}, methods, fit))
        return len(order)

    def write_query_blocks(self, key: str, ids: list, recs: list[dict], methods: list[str]) -> list[dict]:
        """Peer shard: writes the query blocks held under ``key``; exact mode: returns their energy rows."""
        if key not in self._held:
            raise ShardLost(f"shard {self.shard} holds no query blocks {key} (restarted?)")
        return self._write_queries(ids, recs, self._held.pop(key)[1], methods)

    def score_rows(self, sid: str, rows: list[int], n_docs: int, order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Peer shard: its partial exact scores ``[n_docs, Q]`` and ``‖DW‖²`` ``[n_docs]`` of pass ``sid``."""
        return scatter_scores(self._pop_session(sid)[1].collector.result(), order, rows, n_docs)

    def shard_specs(self, stage: str) -> list[ModuleSpec]:
        return list(self.specs(stage).values())

    def shard_doc_sqnorms(self, stage: str, part: Partition) -> tuple[torch.Tensor, torch.Tensor]:
        """This shard's part of each document's squared index norm, and the rows."""
        _, sq, rows = read_index_piece(self.run, stage, self.shard, part)
        return sq, rows

    def shard_query_sqnorms(self) -> dict[str, torch.Tensor]:
        """``{method: [Q]}`` this shard's part of each query vector's squared norm (untruncated)."""
        if self._exact:
            return {m: sum(f.sqnorm for f in per.values()) for m, per in self._query_factors()["factors"].items()}
        return {m: v.to(torch.float64).square().sum(1) for m, v in self._query_vectors()["vectors"].items()}

