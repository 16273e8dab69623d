"""The worker: one replica of the model (or of a shard's blocks) and the work it does.

:class:`Worker` is a plain class, testable without Ray; :func:`remote_worker` wraps it as
a Ray actor (a thin shell). It loads each model once, on first use, and keeps it. Large
arrays never go back to the driver: partial statistics are returned as Ray objects that
the reducer tasks consume by reference, and index pieces are written straight to the run
directory.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Any, Sequence

import torch

from . import attribution, ekfac, faults
from .attribution import PassPlan
from .config import Config
from .data import Document, Partition, read_partition, read_records
from .ekfac import Fisher
from .factors_io import factors_from_bytes
from .models import load_model, load_model_shard, load_tokenizer, parse_dtype
from .modules import ModuleSpec, find_tracked_modules
from .pipeline import ShardLost, ShardSession, pipelined_batches
from .shard_peer import ShardPeer
from .projection import make_projection, project_matrix
from .query_input import finite_queries, load_queries, skipped_summary, write_skipped_queries
from .rundir import RunDir
from .collectors import QueryScoreCollector
from .config import ScoringMode
from .lowrank import QueryFactors, concat, query_block_size, truncate
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
    top_k,
)
from .store import (
    QUERY_FACTOR_FIELDS,
    IndexPieceReader,
    energy_rows,
    read_query_factors,
    write_query_energy,
    write_query_factors,
    factors_rel,
    queries_rel,
    read_fused_piece,
    read_query_vectors,
    write_docs_piece,
    write_fused_piece,
    write_index_piece,
    write_query_vectors,
    write_skipped_piece,
)
from .tokens import Example, tokenize_document, tokenize_prompt_completion


CRASH_ONCE_ENV, CRASH_PEER_ONCE_ENV = faults.CRASH_ONCE_ENV, faults.CRASH_PEER_ONCE_ENV  # for the tests


def partition_provenance(part: Partition, drop: dict[int, str] | None) -> dict:
    """What an index piece of ``part`` was computed from: the file's fingerprint, dropped rows."""
    return {"fingerprint": part.file.fingerprint, "dropped": sorted(int(r) for r in (drop or {}))}


def pick_device(num_gpus: float) -> torch.device:
    """The device Ray gave this process: CUDA when it was assigned a GPU, else the CPU."""
    if num_gpus and torch.cuda.is_available():
        return torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")


class Worker(ShardPeer):
    """Holds the models of one replica, or of one shard of a replica, and runs its passes.

    With ``cluster.shards: S > 1`` a replica is ``S`` workers, each owning a contiguous
    range of decoder blocks (:mod:`ray_influence.shard_model`). Shard 0 is the replica's
    head: the driver sends it the same tasks as an unsharded worker, and it drives the
    other shards (its *peers*, :meth:`set_peers`) through :mod:`ray_influence.pipeline`.
    Each shard keeps its own modules' factors, index columns and query vectors.

    Args:
        cfg: the job config.
        shard: this worker's shard number (0 when ``cluster.shards`` is 1).
        layout: ``(blocks, first, last)`` of this shard; None for a whole model.
        peers: shard 0 of a sharded replica: the actor handles of shards 1..S-1, in order
            (constructor arguments, so a restarted head knows them again).
    """

    def __init__(self, cfg: Config, shard: int = 0, layout: tuple[range, bool, bool] | None = None,
                 peers: Sequence = ()):
        self.cfg = cfg
        self.shard = shard
        self.layout = layout
        self.blocks = layout[0] if layout is not None else None
        self.peers: list = list(peers)
        for p in self.peers:  # a restarted head: passes its previous life left open are void
            p.close_all_sessions.remote()
        self.device = pick_device(cfg.cluster.num_gpus_per_worker)
        self.run = RunDir(cfg.run_dir)
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._specs: dict[str, dict[str, ModuleSpec]] = {}
        self._file_cache: dict = {}
        self._ft_records: list[dict] | None = None
        self._queries_cache: tuple[tuple, dict] | None = None
        self._sessions: dict[str, tuple[ShardSession, PassPlan]] = {}
        self._held: dict[str, torch.Tensor] = {}
        self._piece_reader: IndexPieceReader | None = None
        if cfg.cluster.num_cpus_per_worker >= 1 and self.device.type == "cpu":
            torch.set_num_threads(int(cfg.cluster.num_cpus_per_worker))

    def stats(self) -> dict:
        """This worker's process id, peak resident memory and the parameter bytes it holds."""
        import resource

        params = sum(p.numel() * p.element_size() for m in self._models.values()
                     for p in self._module(m).parameters() if not p.is_meta)
        owned = sorted({n for m in self._models.values() for n, p in self._module(m).named_parameters(
            remove_duplicate=False) if not p.is_meta})
        return {"pid": os.getpid(), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "param_bytes": params, "device": str(self.device), "shard": self.shard,
                "blocks": [self.blocks.start, self.blocks.stop] if self.blocks is not None else None,
                "parameters": owned}

    # ------------------------------------------------------------------ models

    def _model_path(self, stage: str) -> str:
        return self.cfg.pretrained_model if stage == "pretrained" else self.cfg.finetuned_model

    @staticmethod
    def _module(model) -> torch.nn.Module:
        return getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model

    def model(self, stage: str):
        """The stage's frozen model: a whole causal LM, or this shard's :class:`ShardModel`."""
        if stage not in self._models:
            m = self.cfg.model
            if self.layout is None:
                self._models[stage] = load_model(
                    self._model_path(stage), m.dtype, self.device, m.trust_remote_code, m.allow_pickle
                )
            else:
                blocks, first, last = self.layout
                self._models[stage] = load_model_shard(
                    self._model_path(stage), blocks, first, last, m.dtype, self.device, m.trust_remote_code
                )
        return self._models[stage]

    def tokenizer(self, stage: str):
        if stage not in self._tokenizers:
            self._tokenizers[stage] = load_tokenizer(self._model_path(stage), self.cfg.model.trust_remote_code)
        return self._tokenizers[stage]

    def specs(self, stage: str) -> dict[str, ModuleSpec]:
        if stage not in self._specs:
            mods = self.cfg.modules
            self._specs[stage] = find_tracked_modules(self._module(self.model(stage)), mods.include, mods.exclude,
                                                      self.blocks)
        return self._specs[stage]

    def module_names(self, stage: str = "pretrained") -> list[str]:
        return list(self.specs(stage))

    def projections(self, stage: str):
        dim = self.cfg.projection.dim
        if dim == 0:
            return None
        return {n: make_projection(s, dim, self.cfg.projection.seed) for n, s in self.specs(stage).items()}

    # -------------------------------------------------------------------- data

    def corpus_documents(self, part: Partition, drop: dict[int, str] | None = None) -> tuple[list[Document], list]:
        c = self.cfg.corpus
        return read_partition(part, c.id_column, c.text_column, cache=self._file_cache, drop=drop)

    def corpus_examples(self, docs: Sequence[Document]) -> list[Example]:
        tok = self.tokenizer("pretrained")
        return [tokenize_document(tok, str(d.doc_id), d.text, self.cfg.corpus.max_length) for d in docs]

    def finetune_records(self) -> list[dict]:
        if self._ft_records is None:
            f = self.cfg.finetune_data
            self._ft_records = read_records(f.path, [f.prompt_column, f.completion_column])
        return self._ft_records

    def finetune_examples(self, rows: Sequence[int]) -> list[Example]:
        f = self.cfg.finetune_data
        tok = self.tokenizer("finetuned")
        recs = self.finetune_records()
        return [
            tokenize_prompt_completion(
                tok, f"ft{i}", recs[i][f.prompt_column] or "", recs[i][f.completion_column] or "",
                f.max_length, add_eos=True,
            )
            for i in rows
        ]

    def _share_examples(self, stage: str, share: Sequence) -> list[Example]:
        """``share``: for 'pretrained', ``[(Partition, [row offsets])]``; for 'finetuned', row numbers."""
        if stage == "finetuned":
            return self.finetune_examples(share)
        out = []
        for part, rows in share:
            docs, _ = self.corpus_documents(part)
            wanted = set(int(part.offset + r) for r in rows)
            out += self.corpus_examples([d for d in docs if d.position in wanted])
        return out

    # ----------------------------------------------------------------- passes

    def _fisher(self) -> Fisher:
        return Fisher.parse(self.cfg.ekfac.fisher)

    def _plan(self, stage: str, kind: str, *args) -> PassPlan:
        """This worker's collector for one pass over its own tracked modules.

        ``kind``: ``covariance``; ``lambda`` (args: names, *bases); ``gradients`` (args:
        projected); ``terms`` (args: the (method, query) pairs whose stored vectors to use).
        """
        e, specs = self.cfg.ekfac, self.specs(stage)
        if kind == "covariance":
            return attribution.covariance_plan(specs, self._fisher(), e.fisher_samples)
        if kind == "lambda":
            names, bases = args[0], args[1:]
            return attribution.lambda_plan(dict(zip(names, bases)), self._fisher(), e.fisher_samples)
        if kind == "gradients":
            return attribution.gradient_plan(specs, self.projections(stage) if args[0] else None)
        if kind == "scores":
            return PassPlan(QueryScoreCollector(self._pass_factors(args[0])))
        if kind == "terms" and self._exact:
            from .token_influence import TokenTermCollector

            qf = self._query_factors()["factors"]
            pairs = args[0]
            vectors = {n: (torch.cat([qf[m][n].left[q:q + 1] for m, q in pairs]),
                           torch.cat([qf[m][n].right[q:q + 1] for m, q in pairs])) for n in specs}
            return PassPlan(TokenTermCollector(vectors, None))
        if kind == "terms":
            from .token_influence import TERM_DTYPE, TokenTermCollector, split_flat

            qv, dim = self._query_vectors()["vectors"], self.cfg.projection.dim
            flat = torch.stack([qv[m][q].to(TERM_DTYPE) for m, q in args[0]])  # [R, D]
            shapes = {n: (dim, dim) if dim else s.shape for n, s in specs.items()}
            return PassPlan(TokenTermCollector(split_flat(flat, shapes), self.projections(stage)))
        raise ValueError(f"unknown pass kind {kind!r}")

    def _run(self, stage: str, examples: Sequence[Example], plan: PassPlan,
             peer_args: Sequence[tuple] = ()) -> tuple[str, list[str], torch.Tensor, list[str]]:
        """Runs one pass of ``examples`` into ``plan`` (and, sharded, into each peer's plan).

        Args:
            peer_args: per peer, ``(kind, *args)`` of its :meth:`open_session`.

        Returns:
            ``(session id, kept keys in collector order, their losses, skipped keys)``; the
            peers keep their session open under that id.
        """
        e, max_tokens = self.cfg.ekfac, self.cfg.cluster.max_tokens_per_batch
        sid = uuid.uuid4().hex
        if self.layout is not None and not self.peers:
            raise RuntimeError(f"shard {self.shard} holds blocks {self.blocks} only; passes run from the "
                               "replica's first shard, which needs its peers")
        if not self.peers:
            kept, losses, skipped = attribution.run_batches(
                self.model(stage), examples, self.specs(stage), plan.collector, plan.labels, e.seed, max_tokens,
                plan.on_batch)
            return sid, kept, losses, skipped
        import ray

        self._peer_get([p.open_session.remote(sid, stage, *a) for p, a in zip(self.peers, peer_args)])
        head = self._session_for(stage, plan)
        try:
            kept, losses, skipped = pipelined_batches(head, self.peers, sid, examples, max_tokens)
        except ray.exceptions.RayActorError as err:
            raise ShardLost(f"a shard of this replica died mid-pass: {err}") from None
        except BaseException:
            for p in self.peers:
                p.close_session.remote(sid)
            raise
        return sid, kept, losses, skipped

    # ------------------------------------------------------------------ fit

    def covariance(self, stage: str, share: Sequence):
        """Partial A and G sums over this worker's share of the factor sample.

        Returns:
            ``{name: CovarianceStats}``; sharded, one Ray object ref of such a dict per shard.
        """
        return self._fit_pass(stage, share, ("covariance",), [("covariance",)] * len(self.peers))

    def eigendecompose(self, stats: ekfac.CovarianceStats) -> ekfac.Eigenbasis:
        """float64 eigendecomposition of one module's merged A and G (a reducer task)."""
        return ekfac.eigenbasis(stats)

    def lambdas(self, stage: str, share: Sequence, bases: Sequence[dict]):
        """Partial Λ sums over this worker's share, in the reduced eigenbases.

        Args:
            bases: per shard, ``{name: Eigenbasis or its Ray object ref}`` of its modules
                (refs nested in a list reach the worker unresolved: each shard fetches its own).

        Returns:
            ``{name: LambdaStats}``; sharded, one Ray object ref of such a dict per shard.
        """
        own = _resolve(bases[0])
        return self._fit_pass(stage, share, ("lambda", list(own), *own.values()),
                              [("lambda", list(b), *b.values()) for b in bases[1:]])

    def _fit_pass(self, stage: str, share: Sequence, kind: tuple, peer_kinds: Sequence[tuple]):
        examples = self._share_examples(stage, share)
        plan = self._plan(stage, *kind)
        if not self.peers:
            if not examples:
                return {n: None for n in self.specs(stage)}
            self._run(stage, examples, plan)
            return plan.collector.result()
        import ray

        sid, *_ = self._run(stage, examples, plan, peer_kinds)
        return [ray.put(plan.collector.result())] + self._peer_results("session_result", sid)

    # ---------------------------------------------------------------- index

    def _index_rows(self, part: Partition, stages: Sequence[str], drop: dict[int, str] | None) -> "PartitionRows":
        """One partition's projected gradients at each of ``stages``' models, held in memory.

        Sharded, every shard holds its own modules' columns (a peer under the pass's session
        id); a document is kept only when its gradient is finite on every shard.
        """
        faults.inject("corpus_task")
        docs, skipped = self.corpus_documents(part, drop)
        examples = self.corpus_examples(docs)
        keep = torch.ones(len(docs), dtype=torch.bool)
        flats, sids = {}, {}
        for stage in stages:
            flat = torch.zeros(len(docs), index_width(self.specs(stage), self.cfg.projection.dim))
            if examples:
                plan = self._plan(stage, "gradients", True)
                sid, kept, _, _ = self._run(stage, examples, plan, [("gradients", True)] * len(self.peers))
                rows, order = _rows_of(examples, kept), attribution.input_order(examples, kept)
                flat = scatter_rows(plan.collector.result(), list(self.specs(stage)), order, rows, len(docs))
                keep &= finite_rows(flat, rows)
                if self.peers:
                    for mask in self._peer_get(self._peer_results("index_rows", sid, rows, len(docs), order)):
                        keep &= mask
                sids[stage] = sid
            flats[stage] = flat
        skipped += [(docs[j].doc_id, "non_finite_gradient") for j in (~keep).nonzero(as_tuple=True)[0].tolist()]
        return PartitionRows(docs, examples, skipped, keep, flats, sids)

    def _finish_partition(self, part: Partition, rows: "PartitionRows", t0: float) -> dict:
        """Writes the partition's documents and skipped rows; its counts for the driver."""
        kept = rows.kept_rows
        write_docs_piece(self.run, part, rows.kept_docs, [rows.examples[i] for i in kept],
                         self.cfg.scoring.doc_text_chars)
        write_skipped_piece(self.run, part, rows.skipped)
        return {
            "partition": part.key,
            "docs": len(kept),
            "skipped": len(rows.skipped),
            "tokens": sum(len(rows.examples[i]) for i in kept),
            "truncated": sum(rows.examples[i].truncated for i in kept),
            "seconds": time.perf_counter() - t0,
        }

    def index(self, part: Partition, stages: Sequence[str], drop: dict[int, str] | None = None) -> dict:
        """Projected gradients of one partition at each of ``stages``' models, written to the run dir.

        Sharded, every shard writes its own modules' columns.

        Args:
            drop: rows within the file to skip (duplicate ids), with their reason.
        """
        t0 = time.perf_counter()
        rows = self._index_rows(part, stages, drop)
        kept_docs, keep = rows.kept_docs, rows.keep
        prov = partition_provenance(part, drop)
        stubs = [dataclasses.replace(d, text="") for d in kept_docs]
        writes = []
        for stage in stages:
            if stage in rows.sids:
                writes += self._peer_results("write_index", rows.sids[stage], stage, part, stubs, keep, prov)
            elif self.peers:  # an empty partition: every shard writes its empty piece
                writes += [p.write_empty_index.remote(stage, part, prov) for p in self.peers]
            write_index_piece(self.run, stage, self.shard, part, kept_docs, rows.flats[stage][keep],
                              parse_dtype(self.cfg.projection.dtype), prov)
        if writes:
            self._peer_get(writes)
        return self._finish_partition(part, rows, t0)

    def fused_score(self, part: Partition, stages: Sequence[str], drop: dict[int, str] | None,
                    methods: Sequence[str], k: int, token: str) -> dict:
        """The corpus pass of one partition scored on the spot: its top-k per method, no index.

        The projected gradients are rounded to ``projection.dtype`` and scored as the score
        stage scores an index piece, so the results are those of index + score. The top-k
        is also written under ``fused/<token>/`` (``token``: the query set, methods and k),
        so a rerun over the same queries skips the partition.

        Returns:
            the counts of :meth:`index`, plus ``top_k``: ``{method: (values [Q, k'], global positions [Q, k'])}``.
        """
        t0 = time.perf_counter()
        rows = self._index_rows(part, stages, drop)
        file_rows = torch.tensor([d.row for d in rows.kept_docs], dtype=torch.int64)
        dtype = parse_dtype(self.cfg.projection.dtype)
        refs = ([p.held_partial_scores.remote(rows.sids, rows.keep, file_rows, list(methods)) for p in self.peers]
                if rows.sids else [])
        partial, _ = self._partial_scores(methods, rows_scan(rows.flats, rows.keep, file_rows, dtype))
        partial = _add_partials(part, partial, file_rows, self._peer_get(refs) if refs else [])
        top = _top_k_of(part, partial, file_rows, k)
        offset = part.offset - part.start
        sqnorms = {Method.parse(m).doc_model: sq for m, (_, sq, _) in partial.items()}
        write_fused_piece(self.run, token, part, {m: (v, p - offset) for m, (v, p) in top.items()}, sqnorms,
                          file_rows, partition_provenance(part, drop))
        return {**self._finish_partition(part, rows, t0), "top_k": top}

    def exact_score(self, part: Partition, stages: Sequence[str], drop: dict[int, str] | None,
                    methods: Sequence[str], k: int, token: str) -> dict:
        """The exact pass of one partition (``scoring.mode: exact``): its top-k per method, no index.

        Each document's exact gradient at each of ``stages``' models is contracted with the
        low-rank query factors of the methods scored against that model
        (:class:`~ray_influence.collectors.QueryScoreCollector`); sharded, every shard
        scores its own modules and the head adds the partial scores. The top-k and the
        documents' ``‖DW‖²`` go under ``fused/<token>/`` as in :meth:`fused_score`.

        Returns:
            the counts of :meth:`index`, plus ``top_k``: ``{method: (values [Q, k'], global positions [Q, k'])}``.
        """
        t0 = time.perf_counter()
        faults.inject("corpus_task")
        docs, skipped = self.corpus_documents(part, drop)
        examples = self.corpus_examples(docs)
        n = len(docs)
        keep = torch.ones(n, dtype=torch.bool)
        by_stage: dict[str, list[str]] = {}
        for m in methods:
            by_stage.setdefault(Method.parse(m).doc_model, []).append(Method.parse(m).value)
        scored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for stage in stages:
            ms = by_stage.get(stage, [])
            n_q = sum(self._query_factors_count(m) for m in ms)
            s, sq = torch.zeros(n, n_q, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
            if examples and ms:
                plan = self._plan(stage, "scores", ms)
                sid, kept, _, _ = self._run(stage, examples, plan, [("scores", ms)] * len(self.peers))
                rows, order = _rows_of(examples, kept), attribution.input_order(examples, kept)
                parts = [scatter_scores(plan.collector.result(), order, rows, n)]
                if self.peers:
                    parts += self._peer_get(self._peer_results("score_rows", sid, rows, n, order))
                s, sq = (sum(p[0] for p in parts), sum(p[1] for p in parts))
                got = torch.zeros(n, dtype=torch.bool)
                got[rows] = True
                keep &= got & torch.isfinite(s).all(dim=1) & torch.isfinite(sq)
            scored[stage] = (s, sq)
        skipped += [(docs[j].doc_id, "non_finite_gradient") for j in (~keep).nonzero(as_tuple=True)[0].tolist()]
        rows = PartitionRows(docs, examples, skipped, keep, {}, {})
        file_rows = torch.tensor([d.row for d in rows.kept_docs], dtype=torch.int64)
        partial = {}
        qsq = self.query_sqnorms()  # summed over shards: one round trip per partition, not per method
        for stage, ms in by_stage.items():
            s, sq = scored[stage]
            start = 0
            for m in ms:
                width = self._query_factors_count(m)
                partial[m] = (s[keep, start:start + width].T.contiguous(), sq[keep],
                              torch.tensor(qsq[m], dtype=torch.float64))
                start += width
        partial = {Method.parse(m).value: partial[Method.parse(m).value] for m in methods}
        top = _top_k_of(part, partial, file_rows, k)
        offset = part.offset - part.start
        sqnorms = {stage: scored[stage][1][keep] for stage in stages}
        write_fused_piece(self.run, token, part, {m: (v, p - offset) for m, (v, p) in top.items()}, sqnorms,
                          file_rows, partition_provenance(part, drop))
        return {**self._finish_partition(part, rows, t0), "top_k": top}

    # --------------------------------------------------------------- queries

    def queries(self, methods: Sequence[str]) -> dict:
        """Query gradients at θ_ft, preconditioned per method, cut to rank-r factors (exact
        mode) or projected; written to the run dir.

        The queries run in blocks of ``scoring.query_block`` (0: as many as fit in
        :data:`~ray_influence.lowrank.QUERY_STAGE_BYTES`, :func:`~ray_influence.lowrank.query_block_size`):
        a block's exact gradients and full preconditioned vectors live only until its factors
        (or projected rows) are taken, so the stage's memory is one block's plus the factors.
        Sharded, each shard preconditions, cuts and writes its own modules' queries.
        """
        methods = list(methods)
        selection = load_queries(self.cfg.queries, self.tokenizer("finetuned"))  # kept queries, file order
        examples = list(selection.examples)
        block = self._query_block(len(examples), len(methods))
        key = uuid.uuid4().hex  # names the blocks each peer holds until the write
        fit = self._fit_factors(methods)
        parts, skipped = [], []
        for start in range(0, len(examples), block):
            chunk = examples[start:start + block]
            plan = self._plan("finetuned", "gradients", False)
            sid, kept, _, dropped = self._run("finetuned", chunk, plan, [("gradients", False)] * len(self.peers))
            order = attribution.input_order(chunk, kept)
            refs = self._peer_results("query_block", sid, key, order, methods)
            parts.append(self._query_block_of({n: g[order] for n, g in plan.collector.result().items()}, methods, fit))
            self._peer_get(refs)
            skipped += dropped
        if skipped:  # a non-finite loss: skipped and listed too (peers get only the kept ids and records)
            selection = finite_queries(selection, skipped)
        recs, ids = list(selection.records), selection.ids
        refs = [p.write_query_blocks.remote(key, ids, recs, methods) for p in self.peers]
        energy = self._write_queries(ids, recs, parts, methods)
        for rows in self._peer_get(refs) if refs else []:
            energy += rows
        write_skipped_queries(self.run, selection.skipped)
        out = {"queries": len(ids), "methods": [Method.parse(m).value for m in methods], "query_blocks": len(parts),
               **skipped_summary(selection)}
        if self._exact:
            write_query_energy(self.run, energy)
            out.update(_rank_summary(energy, self.cfg.scoring.query_rank))
        return out

    @property
    def _exact(self) -> bool:
        return self.cfg.scoring.scoring_mode is ScoringMode.EXACT

    def _query_block(self, n_queries: int, n_methods: int) -> int:
        """Queries per block of the query stage (``scoring.query_block``, or from the memory budget)."""
        if self.cfg.scoring.query_block:
            return self.cfg.scoring.query_block
        params = sum(s.d_out * s.d_in_aug for s in self.specs("finetuned").values())
        return query_block_size(n_queries, params, n_methods)

    def _fit_factors(self, methods: Sequence[str]) -> dict:
        """``{stage: {module: ModuleFactors}}`` of this shard that ``methods`` precondition with."""
        factors = {}
        for stage in ("finetuned", "pretrained"):
            rel = factors_rel(stage, self.shard)
            if self.run.piece_done(rel):
                factors[stage] = factors_from_bytes(self.run.read_piece(rel))[0]
        for m in methods:
            missing = [s for s in Method.parse(m).needs_factors if s not in factors]
            if missing:
                raise RuntimeError(f"method {Method.parse(m).value} needs {missing} factors; run the fit stage first")
        return factors

    def _query_block_of(self, grads: dict, methods: Sequence[str], fit: dict) -> dict:
        """One block's ``{method: {module: QueryFactors}}`` (exact mode) or ``{method: [B, width]}``.

        Args:
            grads: ``{module: [B, d_out, d_in']}`` exact query gradients of this worker's modules.
            fit: :meth:`_fit_factors`.
        """
        names = list(self.specs("finetuned"))
        projs = None if self._exact else self.projections("finetuned")
        rank = self.cfg.scoring.query_rank
        out = {}
        for m in methods:
            method = Method.parse(m)
            u = query_vectors(method, grads, fit.get("finetuned"), fit.get("pretrained"))
            if self._exact:
                out[method.value] = {n: truncate(u[n], rank) for n in names}
                continue
            if projs is not None:
                u = {n: project_matrix(u[n], projs[n]) for n in names}
            out[method.value] = flatten(u, names)
        return out

    def _write_queries(self, ids: list, recs: list[dict], parts: Sequence[dict], methods: Sequence[str]) -> list[dict]:
        """Writes this shard's query blocks (:meth:`_query_block_of`, in order) as one piece; exact mode:
        returns their energy rows."""
        if not self._exact:
            vectors = {m: torch.cat([p[m] for p in parts]) for m in parts[0]} if parts else {}
            _check_rows(self.shard, ids, vectors.values())
            write_query_vectors(self.run, self.shard, ids, recs, self.cfg.queries, vectors)
            return []
        factors = {m: {n: concat([p[m][n] for p in parts]) for n in parts[0][m]} for m in parts[0]} if parts else {}
        _check_rows(self.shard, ids, [f.sqnorm for per in factors.values() for f in per.values()])
        write_query_factors(self.run, self.shard, ids, recs, self.cfg.queries, factors, self.cfg.scoring.query_rank)
        return energy_rows(ids, factors)

    # ----------------------------------------------------------------- score

    def token_terms(self, stage: str, requests: Sequence, fused_token: str | None = None) -> list:
        """Per-token and per-module terms of top documents (:mod:`ray_influence.token_influence`)."""
        from .token_influence import worker_token_terms

        return worker_token_terms(self, stage, requests, fused_token)

    def example_terms(self, stage: str, example: Example, pairs: Sequence) -> torch.Tensor | None:
        """``[M, R, T]`` per-module, per-position terms of one document for the (method, query) pairs.

        None when its forward is not finite. Sharded, the modules of every shard, in order.
        """
        plan = self._plan(stage, "terms", pairs)
        sid, _, _, skipped = self._run(stage, [example], plan, [("terms", pairs)] * len(self.peers))
        if skipped:
            for p in self.peers:
                p.close_session.remote(sid)
            return None
        parts = [plan.collector.result()]
        if self.peers:
            parts += self._peer_get(self._peer_results("session_result", sid))
        return torch.cat(parts)

    def module_table(self, stage: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Names and decoder blocks of the replica's tracked modules (every shard's, in order)."""
        specs = list(self.specs(stage).values())
        if self.peers:
            for other in self._peer_get([p.shard_specs.remote(stage) for p in self.peers]):
                specs += other
        return tuple(s.name for s in specs), tuple(s.block for s in specs)

    def doc_sqnorms(self, stage: str, part: Partition, fused_token: str | None = None) -> dict[int, float]:
        """``{row: squared norm}`` of a partition's index rows, summed over shards.

        ``fused_token``: read them from that fused pass's piece instead (there is no index).
        """
        if fused_token is not None:
            _, sqnorms, rows = read_fused_piece(self.run, fused_token, part)
            return dict(zip(rows.tolist(), sqnorms[stage].tolist()))
        sq, rows = self.shard_doc_sqnorms(stage, part)
        if self.peers:
            for other, _ in self._peer_get([p.shard_doc_sqnorms.remote(stage, part) for p in self.peers]):
                sq = sq + other
        return dict(zip(rows.tolist(), sq.tolist()))

    def query_sqnorms(self) -> dict[str, list[float]]:
        """``{method: [Q]}`` squared norms of the stored query vectors, summed over shards."""
        sq = self.shard_query_sqnorms()
        if self.peers:
            for other in self._peer_get([p.shard_query_sqnorms.remote() for p in self.peers]):
                sq = {m: sq[m] + other[m] for m in sq}
        return {m: v.tolist() for m, v in sq.items()}

    def _stored_queries(self, reader) -> dict:
        """``reader(run, shard)`` of this shard's query piece, read once per piece (its sha256)."""
        marker = self.run.piece_done(queries_rel(self.shard))
        key = (reader.__name__, marker["sha256"] if marker else None)
        if self._queries_cache is None or self._queries_cache[0] != key:
            self._queries_cache = (key, reader(self.run, self.shard))
        return self._queries_cache[1]

    def _query_factors(self) -> dict:
        """This shard's stored low-rank query factors (exact mode)."""
        return self._stored_queries(read_query_factors)

    def _pass_factors(self, methods: Sequence[str]) -> dict:
        """``{name: QueryFactors}`` of every (method, query) pair of ``methods``, methods after one another."""
        qf = self._query_factors()["factors"]
        names = list(next(iter(qf.values()))) if qf else []
        if len(methods) == 1:  # no copy
            return dict(qf[Method.parse(methods[0]).value])
        return {n: QueryFactors(*(torch.cat([getattr(qf[m][n], f) for m in methods]) for f in QUERY_FACTOR_FIELDS))
                for n in names}

    def _query_factors_count(self, method: str) -> int:
        """How many queries the stored factors of ``method`` hold."""
        per = self._query_factors()["factors"][Method.parse(method).value]
        return next(iter(per.values())).left.shape[0] if per else len(self._query_factors()["ids"])

    def _query_vectors(self) -> dict:
        """This shard's stored projected (or exact-index) query vectors (modes index and fused)."""
        return self._stored_queries(read_query_vectors)

    def _partial_scores(self, methods: Sequence[str], scan) -> tuple[dict, torch.Tensor]:
        """This shard's partial scores of one partition's rows, fed stage by stage by ``scan``.

        ``scan(stage, add)`` feeds the stage's document rows block by block to ``add`` and
        returns ``(doc sqnorm [N], rows within the file [N])``.

        Returns:
            ``({method: (scores [Q, N] float64, doc sqnorm [N], query sqnorm [Q])}, rows [N])``.
        """
        qv = self._query_vectors()
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

    def partial_scores(self, part: Partition, methods: Sequence[str]) -> tuple[dict, torch.Tensor]:
        """This shard's partial scores of one partition's index pieces (summed over shards later).

        Each index piece is streamed once (:class:`~ray_influence.store.IndexPieceReader`:
        read and checksum in a background thread, overlapped with the matmuls), however
        many methods score against it.
        """
        if self._piece_reader is None:
            self._piece_reader = IndexPieceReader(self.run)
        return self._partial_scores(methods, lambda stage, add: self._piece_reader.scan(stage, self.shard, part, add))

    def score(self, part: Partition, methods: Sequence[str], k: int) -> dict:
        """Top-k of one partition per method: ``{method: (values [Q, k'], global positions [Q, k'])}``."""
        refs = [p.partial_scores.remote(part, methods) for p in self.peers]
        partial, rows = self.partial_scores(part, methods)
        return _top_k_of(part, _add_partials(part, partial, rows, self._peer_get(refs) if refs else []), rows, k)


def _add_partials(part: Partition, partial: dict, rows: torch.Tensor, others: Sequence) -> dict:
    """The shards' partial scores and squared norms, added up (``others``: the peers' ``(partial, rows)``)."""
    for other, other_rows in others:
        if not torch.equal(other_rows, rows):
            raise RuntimeError(f"partition {part.key}: the shards' index pieces hold different rows")
        partial = {m: tuple(a + b for a, b in zip(partial[m], other[m])) for m in partial}
    return partial


def _top_k_of(part: Partition, partial: dict, rows: torch.Tensor, k: int) -> dict:
    """The top-k per method of a partition's scores; cosine scores divide by the query's and document's norms."""
    positions = rows + (part.offset - part.start)  # this run's global positions
    out = {}
    for m, (s, sqnorm, qsq) in partial.items():
        if Method.parse(m).cosine:
            s = s / (qsq.sqrt()[:, None] * sqnorm.sqrt()[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
        out[m] = top_k(s, k, positions)
    return out


@dataclasses.dataclass
class PartitionRows:
    """One partition's documents and, per stage, its flat projected gradients (all rows).

    Attributes:
        docs: the partition's readable documents; ``examples`` their tokens, in order.
        skipped: ``(doc_id, reason)`` of the rows not kept.
        keep: ``[len(docs)]`` bool, the documents with a finite gradient on every shard.
        flats: ``{stage: [len(docs), width]}`` this shard's columns (rows not kept are junk).
        sids: ``{stage: session id}`` under which the peers hold their columns.
    """

    docs: list
    examples: list
    skipped: list
    keep: torch.Tensor
    flats: dict
    sids: dict

    @property
    def kept_rows(self) -> list[int]:
        return self.keep.nonzero(as_tuple=True)[0].tolist()

    @property
    def kept_docs(self) -> list:
        return [self.docs[i] for i in self.kept_rows]


def _rank_summary(energy: Sequence[dict], rank: int) -> dict:
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


def _check_rows(shard: int, ids: Sequence, tensors) -> None:
    """Every held query tensor has one row per kept query (a peer restarted mid-stage has fewer)."""
    for t in tensors:
        if t.shape[0] != len(ids):
            raise ShardLost(f"shard {shard} holds {t.shape[0]} query rows for {len(ids)} queries (restarted?)")


def _resolve(refs: dict) -> dict:
    """``{name: value}`` from values or Ray object refs."""
    import ray

    keys = list(refs)
    vals = list(refs.values())
    idx = [i for i, v in enumerate(vals) if isinstance(v, ray.ObjectRef)]
    if idx:
        for i, v in zip(idx, ray.get([vals[i] for i in idx])):
            vals[i] = v
    return dict(zip(keys, vals))


def _rows_of(examples: Sequence[Example], kept: Sequence[str]) -> list[int]:
    """Input positions of the examples a pass kept, in input order."""
    got = set(kept)
    return [i for i, e in enumerate(examples) if e.key in got]


def remote_worker(cfg: Config, shard: int = 0, layout: tuple[range, bool, bool] | None = None,
                  placement: tuple[Any, int] | None = None, peers: Sequence = ()):
    """Starts a :class:`Worker` as a Ray actor with the config's resources.

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
    actor_cls = ray.remote(Worker).options(
        num_cpus=c.num_cpus_per_worker, num_gpus=c.num_gpus_per_worker,
        max_restarts=c.max_restarts, max_task_retries=c.max_restarts,
        **({"runtime_env": {"env_vars": env}} if env else {}), **options,
    )
    return actor_cls.remote(cfg, shard, layout, list(peers))
