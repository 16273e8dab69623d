"""The driver: orders the stages of the job on Ray (DESIGN.md §3).

    fit    for θ_pt on a seeded corpus sample, and θ_ft on the fine-tuning data:
           covariance pass (workers) -> merge -> eigh per module (tasks) -> Λ pass -> merge -> save
    query  query gradients at θ_ft, preconditioned per method; then, by scoring.mode,
           cut to rank-r factors (exact) or projected (index, fused)
    score  exact / fused: the corpus pass itself into a score sink, each partition scored on
           the spot (workers) -> top-k -> merge -> results Parquet; no index is written
           index: per partition, scores of the stored index and top-k -> merge -> Parquet
    index  (scoring.mode: index only) the corpus pass into an index sink: projected document
           gradients, written by the workers

The corpus pass feeds a sink (:mod:`ray_influence.corpus_sinks`), which names the pieces of
a finished partition. A rerun skips what is complete: factors whose file is there; in exact
and fused mode the partitions already scored for the same query set (``fused/<token>/``),
so a grown corpus scores only its new partitions and new queries start a fresh pass; in
index mode the index partitions whose pieces are there. The driver plans from the pieces'
markers and reads no piece but a top-k: the workers read and checksum the pieces in
parallel (:meth:`Job._verify`), and a damaged one is dropped and recomputed. The query
stage is cheap and always recomputed. The actors live in :mod:`ray_influence.actors`, what
is written at the end of scoring in :mod:`ray_influence.results`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import sys
import time
from collections import defaultdict
from typing import Any, Sequence

import ray

from . import __version__
from .actors import IN_FLIGHT_PER_WORKER, ReplicaPool, drain, progress_bar
from .config import Config, ConfigError, ScoringMode
from .data import Partition, duplicate_rows, list_files, plan_partitions, read_records
from .preflight import check_run_dir, preflight
from .reducer import merge_topk
from .results import run_metadata, token_requests, write_result_tables
from .rundir import DamagedArtifact, RunDir
from .store import (
    STAGES,
    factors_rel,
    index_rel,
    queries_rel,
    stored_query_ids,
    write_skipped_summary,
)
from .corpus_sinks import CorpusSink, ExactScoreSink, FusedScoreSink, IndexSink, partition_provenance
from .pass_spec import PassSpec
from .pipeline import ShardLost

STAGE_ORDER = ("fit", "index", "query", "score")
PASS_STAGE_ORDER = ("fit", "query", "score")
"""Modes without an index (exact, fused): the score stage runs the corpus pass itself."""

def bind_run_dir(run: RunDir, cfg: Config) -> None:
    """Records the config in ``run.json`` (after :func:`check_run_dir` passed)."""
    check_run_dir(cfg)
    run.write_json("run.json", {"config": cfg.to_dict(), "version": __version__})


class Job:
    """One run of the attribution job over a config."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.run = RunDir(cfg.run_dir)
        self.pool = ReplicaPool(cfg, self.log)
        self.timings: dict[str, float] = {}
        self.summary: dict[str, Any] = {}
        self.damaged: list[str] = []
        self.duplicates: dict[str, dict[int, str]] = {}
        self.topk: dict = {}  # {method: (values [Q, k], positions [Q, k])} of the last score stage
        self.partition_times: list[tuple[int, float]] = []  # (tokens, worker seconds) per indexed partition

    # --------------------------------------------------------------- plumbing

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    @property
    def workers(self) -> list:
        """One actor per replica: its worker, or its shard 0 (the head)."""
        return self.pool.workers

    @property
    def reducer(self):
        return self.pool.reducer

    def start_workers(self) -> None:
        self.pool.start()

    def stop_workers(self) -> None:
        stats = self.pool.stop()
        if stats is not None:
            self.summary["workers"] = [{k: v for k, v in st.items() if k != "parameters"} for st in stats]

    def partitions(self) -> list[Partition]:
        c = self.cfg.corpus
        return plan_partitions(list_files(c.path), c.partition_docs)

    def stages_needed(self) -> list[str]:
        return sorted({m.doc_model for m in self.cfg.methods}, key=STAGES.index)

    # ------------------------------------------------------------------- fit

    def _retrying(self, what: str, fn, *args):
        """``fn(*args)``, rerun when it lost a shard (Ray restarts it), up to ``max_restarts`` times."""
        for attempt in range(self.cfg.cluster.max_restarts + 1):
            try:
                return fn(*args)
            except ShardLost as e:
                if attempt == self.cfg.cluster.max_restarts:
                    raise
                self.log(f"{what}: a shard was lost ({e}); retrying")

    def fit(self, parts: Sequence[Partition]) -> None:
        for stage in STAGES:
            if any(stage in m.needs_factors for m in self.cfg.methods):  # only the factors a method uses
                self._retrying(f"fit[{stage}]", self._fit_stage, stage, parts)

    def _shares(self, stage: str, parts: Sequence[Partition]) -> list[list]:
        """The seeded factor sample, split over the workers."""
        e, n_workers = self.cfg.ekfac, len(self.workers)
        rng = random.Random(f"{e.seed}:{stage}")
        if stage == "finetuned":
            f = self.cfg.finetune_data
            n = len(read_records(f.path, [f.prompt_column, f.completion_column]))
            rows = sorted(rng.sample(range(n), min(n, e.covariance_max_docs)))
            return [rows[i::n_workers] for i in range(n_workers)]
        total = parts[-1].offset + len(parts[-1]) if parts else 0
        positions = sorted(rng.sample(range(total), min(total, e.covariance_max_docs)))
        offsets = [p.offset for p in parts]
        by_part: dict[int, list[int]] = defaultdict(list)
        for pos in positions:
            i = bisect.bisect_right(offsets, pos) - 1
            if pos - parts[i].offset + parts[i].start in self.duplicates.get(parts[i].key, {}):
                continue  # a duplicate id: only its first occurrence counts
            by_part[i].append(pos - parts[i].offset)
        shares: list[list] = [[] for _ in range(n_workers)]
        for j, (i, rows) in enumerate(sorted(by_part.items())):
            shares[j % n_workers].append((parts[i], rows))
        return shares

    def _fit_stage(self, stage: str, parts: Sequence[Partition]) -> None:
        n_shards = self.cfg.cluster.shards
        rels = [factors_rel(stage, s) for s in range(n_shards)]
        if all(self._marker_ok(rel) for rel in rels) and not self._verify(rels):
            self.log(f"fit[{stage}]: factors already in {self.cfg.run_dir}/{rels[0].rsplit('.shard-', 1)[0]}*, skipped")
            return
        t0 = time.perf_counter()
        shares = self._shares(stage, parts)
        names = ray.get([a.module_names.remote(stage) for a in self.pool.shard_actors[0]])  # per shard
        actors = self.pool.all_actors()

        def merged(parts_: list[list], s: int) -> list:
            out = self.reducer.merge.options(num_returns=len(names[s])).remote(names[s], *[p[s] for p in parts_])
            return out if len(names[s]) > 1 else [out]

        # Per replica, per shard: a ref of the shard's partial sums.
        cov_parts = ray.get([w.fit_pass.remote(PassSpec.covariance(stage), sh) for w, sh in zip(self.workers, shares)])
        cov = [merged(cov_parts, s) for s in range(n_shards)]
        # One eigendecomposition per module, spread over the (already warm) worker actors.
        flat_cov = [c for cs in cov for c in cs]
        flat_bases = [actors[i % len(actors)].eigendecompose.remote(c) for i, c in enumerate(flat_cov)]
        bases, i = [], 0
        for s in range(n_shards):
            bases.append(flat_bases[i:i + len(names[s])])
            i += len(names[s])
        by_shard = [dict(zip(names[s], bases[s])) for s in range(n_shards)]  # nested refs: resolved by the workers
        lam_spec = PassSpec.lambdas(stage, by_shard)
        lam_parts = ray.get([w.fit_pass.remote(lam_spec, sh) for w, sh in zip(self.workers, shares)])
        lam = [merged(lam_parts, s) for s in range(n_shards)]
        e = self.cfg.ekfac
        meta = {"fisher": str(e.fisher), "fisher_samples": e.fisher_samples, "damping_spec": e.damping_for(stage),
                "model": self.cfg.pretrained_model if stage == "pretrained" else self.cfg.finetuned_model}
        results = ray.get([self.reducer.save.remote(self.cfg.run_dir, stage, s, names[s], e.damping_for(stage), meta,
                                                    *bases[s], *cov[s], *lam[s]) for s in range(n_shards)])
        result = {**results[0], "modules": sum(r["modules"] for r in results)}
        self.summary[f"fit_{stage}"] = {k: v for k, v in result.items() if k != "damping"}
        self.log(f"fit[{stage}]: {result['modules']} modules, {result['docs']} docs, {result['tokens']} tokens, "
                 f"{time.perf_counter() - t0:.1f}s")

    # ----------------------------------------------------------------- index

    def _marker_ok(self, rel: str, provenance: dict | None = None) -> bool:
        """Whether a piece's marker says it is complete and (for corpus pieces) still matches the
        corpus. Reads the marker only; the piece itself is checked by :meth:`_verify`."""
        marker = self.run.piece_done(rel)
        return marker is not None and (provenance is None or all(marker.get(k) == v for k, v in provenance.items()))

    def _verify(self, rels: Sequence[str]) -> set[str]:
        """The pieces among ``rels`` that are damaged (size or checksum), dropped so they are recomputed.

        The workers read and checksum them, in parallel (:func:`ray_influence.shard_steps.verify_pieces`);
        the driver reads no piece. Damaged pieces are logged and counted in ``rels``' order.
        """
        if not rels:
            return set()
        per = -(-len(rels) // (len(self.workers) * IN_FLIGHT_PER_WORKER))
        chunks = [list(rels[i:i + per]) for i in range(0, len(rels), per)]
        found: set[str] = set()
        drain(self.workers, chunks, lambda w, c: w.verify_pieces.remote(c), lambda _, bad: found.update(bad))
        for rel in rels:
            if rel in found:
                self.log(f"damaged, recomputing: {self.cfg.run_dir}/{rel}")
                self.damaged.append(rel)
        return found

    def _partition_rels(self, part: Partition, sink: CorpusSink) -> list[str] | None:
        """The pieces of a partition the sink finished (:meth:`CorpusSink.pieces`); None when a
        marker is missing or the corpus changed under them."""
        prov = partition_provenance(part, self.duplicates.get(part.key))
        pieces = sink.pieces(part, self.cfg.cluster.shards)
        if all(self._marker_ok(rel, prov if matched else None) for rel, matched in pieces):
            return [rel for rel, _ in pieces]
        return None

    def _resume(self, parts: Sequence[Partition], sink: CorpusSink, on_result) -> list[Partition]:
        """Feeds the partitions ``sink`` finished before to ``on_result``; returns the others (to do)."""
        done = self._done_partitions(parts, lambda p: self._partition_rels(p, sink))
        todo = []
        for p in parts:
            try:
                result = sink.resumed(self.run, p) if p.key in done else None
            except DamagedArtifact as e:  # a top-k piece is read here in full ([Q, k] per method)
                self.log(f"damaged, recomputing: {e}")
                self.damaged.append(sink.pieces(p, self.cfg.cluster.shards)[0][0])
                self.run.invalidate(self.damaged[-1])
                result = None
            if result is None:
                todo.append(p)
            else:
                on_result(p, result)
        return todo

    def _done_partitions(self, parts: Sequence[Partition], rels_of) -> set[str]:
        """Keys of the partitions whose pieces (``rels_of(part)``: a list, or None when not done) are all intact."""
        planned = {p.key: rels_of(p) for p in parts}
        damaged = self._verify([r for rels in planned.values() if rels for r in rels])
        return {k for k, rels in planned.items() if rels is not None and not damaged.intersection(rels)}

    def _corpus_pass(self, parts: Sequence[Partition], todo: Sequence[Partition], desc: str, submit,
                     on_result=None) -> dict:
        """Runs ``submit(worker, partition)`` over ``todo`` with a progress bar; the corpus counts."""
        totals = {"docs": 0, "tokens": 0, "skipped": 0, "truncated": 0, "partitions": 0}
        bar = progress_bar(sum(len(p) for p in todo), desc, "doc", self.progress)
        t0 = time.perf_counter()

        def on_done(part: Partition, result: dict) -> None:
            if on_result is not None:
                on_result(part, result)
            self.partition_times.append((result["tokens"], result["seconds"]))
            for k in ("docs", "tokens", "skipped", "truncated"):
                totals[k] += result[k]
            totals["partitions"] += 1
            bar.update(len(part))
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(docs_s=f"{totals['docs'] / dt:.1f}", tok_s=f"{totals['tokens'] / dt:.0f}")

        drain(self.workers, todo, submit, on_done, retries=self.cfg.cluster.max_restarts)
        bar.close()
        totals["skipped_total"] = write_skipped_summary(self.run, parts)
        totals["partitions_total"] = len(parts)
        totals["damaged_recomputed"] = list(self.damaged)
        totals["duplicate_ids"] = sum(len(v) for v in self.duplicates.values())
        return totals

    def corpus_sink(self) -> CorpusSink:
        """The sink of this run's corpus pass, by ``scoring.mode`` (the score sinks need the query stage done)."""
        stages = tuple(self.stages_needed())
        mode = self.cfg.scoring.scoring_mode
        if mode.has_index:
            return IndexSink(stages)
        sink = ExactScoreSink if mode is ScoringMode.EXACT else FusedScoreSink
        return sink(stages, tuple(m.value for m in self.cfg.methods), self.cfg.scoring.top_k, self.fused_token())

    def _run_corpus(self, parts: Sequence[Partition], sink: CorpusSink, desc: str, on_result=None) -> dict:
        """The corpus pass into ``sink`` over the partitions it has not finished; its counts.

        ``on_result(partition, result)`` gets what the sink returns, of resumed partitions too.
        """
        on_result = on_result or (lambda part, result: None)
        todo = self._resume(parts, sink, on_result)
        self.log(f"{desc}: {len(parts) - len(todo)} of {len(parts)} partitions already done, {len(todo)} to go"
                 + ("" if isinstance(sink, IndexSink) else " (scored for these queries; no index is written)"))
        return self._corpus_pass(parts, todo, desc,
                                 lambda w, p: w.corpus.remote(p, sink, self.duplicates.get(p.key)), on_result)

    def index(self, parts: Sequence[Partition]) -> None:
        self.summary["index"] = self._run_corpus(parts, self.corpus_sink(), "index")

    # ----------------------------------------------------------------- query

    def query(self) -> None:
        methods = [m.value for m in self.cfg.methods]
        result = self._retrying("query", lambda: ray.get(self.workers[0].queries.remote(methods)))
        self.summary["query"] = result
        self.log(f"query: {result['queries']} queries x {len(result['methods'])} methods, "
                 f"{result.get('skipped', 0)} skipped (listed in {self.cfg.run_dir}/skipped_queries.parquet)")

    # ----------------------------------------------------------------- score

    def score(self, parts: Sequence[Partition]) -> None:
        methods = [m.value for m in self.cfg.methods]
        k = self.cfg.scoring.top_k
        bar = progress_bar(len(parts), "score", "partition", self.progress)
        merged: dict = {}

        def on_done(part: Partition, partial: dict) -> None:
            # Streaming merge: the driver holds one [Q, k] top-k per method, whatever the corpus size.
            _merge_into(merged, partial, k)
            bar.update(1)

        drain(self.workers, parts, lambda w, p: w.score.remote(p, methods, k), on_done)
        bar.close()
        self.summary["score"] = write_result_tables(self.run, self.cfg, parts, merged)
        self.topk = merged

    def fused_token(self) -> str:
        """Names what a scoring pass scores: every shard's query piece, the methods, k, the mode (and dtype)."""
        shas = []
        for s in range(self.cfg.cluster.shards):
            marker = self.run.piece_done(queries_rel(s))
            if marker is None:
                raise RuntimeError(f"{self.cfg.run_dir} holds no query vectors; run the query stage first")
            shas.append(marker["sha256"])
        mode = self.cfg.scoring.scoring_mode
        key = {"queries": shas, "methods": [m.value for m in self.cfg.methods], "top_k": self.cfg.scoring.top_k,
               "dtype": self.cfg.projection.dtype}
        if mode is ScoringMode.EXACT:  # the query pieces already name the rank; rows are not rounded
            key = {**key, "mode": mode.value, "dtype": None}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def fused_score(self, parts: Sequence[Partition]) -> None:
        """The corpus pass and the scoring in one (``scoring.mode`` exact or fused): no index is written.

        The corpus pass feeds a score sink (:meth:`corpus_sink`): exact, every document's
        exact gradient against the low-rank query factors (:class:`~ray_influence.corpus_sinks.ExactScoreSink`);
        fused, its projected rows against the projected queries
        (:class:`~ray_influence.corpus_sinks.FusedScoreSink`). Each partition's top-k is kept under
        ``fused/<token>/`` (:meth:`fused_token`), so a rerun for the same queries scores
        only the partitions not done yet.
        """
        k, merged = self.cfg.scoring.top_k, {}
        self.summary["score_corpus"] = self._run_corpus(
            parts, self.corpus_sink(), f"score ({self.cfg.scoring.scoring_mode.value})",
            lambda _, result: _merge_into(merged, result["top_k"], k))
        self.summary["score"] = write_result_tables(self.run, self.cfg, parts, merged)
        self.topk = merged

    # ---------------------------------------------------------------- tokens

    def token_influence(self, parts: Sequence[Partition]) -> None:
        """Per-token and per-module influence of each query's top documents (part of scoring).

        Runs on the workers, which hold the models: each gets chunks of documents with the
        (method, query) pairs to explain. Writes ``token_influence/`` and ``layer_influence/``.
        """
        from .store import TOKEN_TABLES, write_method_table
        from .token_influence import influence_tables

        top = self.cfg.scoring.token_influence_top
        query_ids = stored_query_ids(self.run)
        chunks, ranks = token_requests(self.topk, parts, top, len(self.workers) * IN_FLIGHT_PER_WORKER)
        terms: list = []
        sink = self.corpus_sink()  # where the documents' norms are
        drain(self.workers, chunks, lambda w, c: w.token_terms.remote(*c, sink),
               lambda _, result: terms.extend(result))
        meta = run_metadata(self.cfg)
        tables = influence_tables(terms, query_ids, ranks)
        for method, per_table in tables.items():
            for name in TOKEN_TABLES:
                write_method_table(self.run, name, method, per_table[name], meta)
        self.summary["tokens"] = {"top": top, "documents": sum(len(r) for _, r in chunks),
                                  "rows": {m: t["token_influence"].num_rows for m, t in tables.items()},
                                  "tables": [f"{self.cfg.run_dir}/{n}" for n in TOKEN_TABLES]}
        self.log(f"tokens: per-token influence of {self.summary['tokens']['documents']} top documents")

    # -------------------------------------------------------------------- all

    def stage_runners(self, parts: Sequence[Partition]) -> dict[str, Any]:
        """``{stage: run it}``: the dispatch table of :meth:`execute` (the score stage by ``scoring.mode``)."""
        has_index = self.cfg.scoring.scoring_mode.has_index
        return {"fit": lambda: self.fit(parts), "index": lambda: self.index(parts), "query": self.query,
                "score": (lambda: self.score(parts)) if has_index else (lambda: self.fused_score(parts))}

    def execute(self, stage: str = "all", checked: bool = False) -> dict:
        """Runs the stages; ``checked`` says :func:`preflight` already passed for them."""
        stages = stages_of(stage, self.cfg.scoring.scoring_mode)
        if not checked:
            preflight(self.cfg, stages)
        bind_run_dir(self.run, self.cfg)
        parts = self.partitions()
        self.duplicates = duplicate_rows(parts, self.cfg.corpus.id_column)
        self.start_workers()
        try:
            runners = self.stage_runners(parts)
            for name in stages:
                t0 = time.perf_counter()
                runners[name]()
                self.timings[name] = time.perf_counter() - t0
                if name == "score" and self.cfg.scoring.token_influence_top:
                    t0 = time.perf_counter()
                    self.token_influence(parts)
                    self.timings["tokens"] = time.perf_counter() - t0
        finally:
            self.stop_workers()
        self._write_manifest(parts)
        return {"timings": self.timings, **self.summary}

    def _write_manifest(self, parts: Sequence[Partition]) -> None:
        old = self.run.read_json("manifest.json") if self.run.exists("manifest.json") else {"stages": {}}
        for name, seconds in self.timings.items():
            old["stages"][name] = {"done": True, "seconds": seconds, "finished": time.time(),
                                   **({"summary": self.summary[name]} if name in self.summary else {})}
        old["partitions"] = {p.key: {"file": p.file.url, "rows": [p.start, p.stop], "offset": p.offset}
                             for p in parts}
        old["index"] = {s: sorted(p.key for p in parts if self.run.piece_done(index_rel(s, 0, p.key)))
                        for s in STAGES}
        self.run.write_json("manifest.json", old)


def stages_of(stage: str, mode: ScoringMode | str = ScoringMode.INDEX) -> tuple[str, ...]:
    """The stages ``--stage`` names (``all``: every one, in order) in ``scoring.mode`` ``mode``."""
    mode = ScoringMode.parse(mode)
    if stage != "all" and stage not in STAGE_ORDER:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {('all',) + STAGE_ORDER}")
    if not mode.has_index and stage == "index":
        raise ConfigError(f"scoring.mode is {mode.value!r}, so there is no index stage: the score stage runs the "
                          "corpus pass (use --stage score or all, or set scoring.mode: index to build an index)")
    if stage == "all":
        return STAGE_ORDER if mode.has_index else PASS_STAGE_ORDER
    return (stage,)


def _merge_into(merged: dict, partial: dict, k: int) -> None:
    """Merges one partition's ``{method: (values, positions)}`` top-k into ``merged``, in place."""
    merged.update(merge_topk(k, *([merged, partial] if merged else [partial])))


def run_job(cfg: Config, stage: str = "all", progress: bool = True, checked: bool = False) -> dict:
    """Runs ``stage`` (or all) on the Ray cluster this process is connected to.

    Args:
        checked: :func:`ray_influence.preflight.preflight` already passed (skip it).
    """
    return Job(cfg, progress).execute(stage, checked)
