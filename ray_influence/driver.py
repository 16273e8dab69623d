"""The driver: orders the stages of the job on Ray (DESIGN.md §3).

    fit    for θ_pt on a seeded corpus sample, and θ_ft on the fine-tuning data:
           covariance pass (workers) -> merge -> eigh per module (tasks) -> Λ pass -> merge -> save
    query  query gradients at θ_ft, preconditioned per method; then, by scoring.mode,
           cut to rank-r factors (exact) or projected (index, fused)
    score  exact / fused: the corpus pass itself, each partition scored on the spot
           (workers) -> top-k -> merge -> results Parquet; no index is written
           index: per partition, scores of the stored index and top-k -> merge -> Parquet
    index  (scoring.mode: index only) per corpus partition: projected document gradients,
           written by the workers

A rerun skips what is complete: factors whose file is there; in exact and fused mode the
partitions already scored for the same query set (``fused/<token>/``), so a grown corpus
scores only its new partitions and new queries start a fresh pass; in index mode the index
partitions whose pieces are there. The query stage is cheap and always recomputed.
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
from tqdm import tqdm

from . import __version__
from .config import Config, ConfigError, ScoringMode
from .data import Partition, duplicate_rows, list_files, plan_partitions, read_records
from .preflight import check_run_dir, preflight
from .reducer import merge_topk, remote_reducer
from .rundir import DamagedArtifact, RunDir
from .scoring import Method
from .store import (
    STAGES,
    docs_rel,
    factors_rel,
    fused_from_bytes,
    fused_rel,
    index_rel,
    queries_rel,
    read_parquet_piece,
    skipped_rel,
    stored_query_ids,
    results_table,
    write_results,
    write_skipped_summary,
)
from .pipeline import ShardLost
from .shard_model import model_blocks, shard_layout
from .corpus_pass import partition_provenance
from .pass_spec import PassSpec
from .worker import remote_worker

STAGE_ORDER = ("fit", "index", "query", "score")
PASS_STAGE_ORDER = ("fit", "query", "score")
"""Modes without an index (exact, fused): the score stage runs the corpus pass itself."""
IN_FLIGHT_PER_WORKER = 2

def bind_run_dir(run: RunDir, cfg: Config) -> None:
    """Records the config in ``run.json`` (after :func:`check_run_dir` passed)."""
    check_run_dir(cfg)
    run.write_json("run.json", {"config": cfg.to_dict(), "version": __version__})


def _progress(total: int, desc: str, unit: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _drain(workers: Sequence, items: Sequence, submit, on_done, in_flight: int = IN_FLIGHT_PER_WORKER,
           retries: int = 3) -> None:
    """Runs ``submit(worker, item)`` over ``items``, keeping each worker ``in_flight`` deep.

    A task whose actor died for good is resubmitted to another worker (its item is
    retried), so one lost worker does not lose a partition. A task that lost a shard of
    its replica (:class:`ShardLost`: Ray restarts the shard) is retried, ``retries`` times
    per item at most.
    """
    queue = list(items)[::-1]
    running: dict = {}
    alive = list(workers)
    lost: dict[int, int] = defaultdict(int)

    def feed(worker) -> None:
        if queue:
            item = queue.pop()
            running[submit(worker, item)] = (worker, item)

    for w in alive:
        for _ in range(in_flight):
            feed(w)
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        worker, item = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except ShardLost:
            lost[id(item)] += 1
            if lost[id(item)] > retries:
                raise
            queue.append(item)
            feed(worker)
            continue
        except ray.exceptions.RayActorError:
            if worker in alive:
                alive.remove(worker)
            if not alive:
                raise
            queue.append(item)
            feed(alive[0])
            continue
        on_done(item, result)
        feed(worker)


class Job:
    """One run of the attribution job over a config."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.run = RunDir(cfg.run_dir)
        self.workers: list = []  # one per replica: its worker, or its shard 0 (the head)
        self.shard_actors: list[list] = []  # per replica, its shards' actors
        self.placement_groups: list = []
        self.reducer = None
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

    def start_workers(self) -> None:
        """One worker per replica; with shards, one actor per shard in a placement group each."""
        if self.workers:
            return
        c = self.cfg.cluster
        if c.shards == 1:
            self.workers = [remote_worker(self.cfg) for _ in range(c.replicas)]
            self.shard_actors = [[w] for w in self.workers]
        else:
            layout = shard_layout(model_blocks(self.cfg.pretrained_model, self.cfg.model.trust_remote_code), c.shards)
            for _ in range(c.replicas):
                pg = self._placement_group()
                place = [(pg, s) if pg is not None else None for s in range(c.shards)]
                peers = [remote_worker(self.cfg, s, layout[s], place[s]) for s in range(1, c.shards)]
                self.shard_actors.append([remote_worker(self.cfg, 0, layout[0], place[0], peers)] + peers)
            self.workers = [a[0] for a in self.shard_actors]
            self.log(f"shards: {c.replicas} replica(s) x {c.shards} shards, blocks "
                     + ", ".join(f"[{r.start}, {r.stop})" for r, _, _ in layout))
        self.reducer = remote_reducer(self.cfg)

    def _placement_group(self):
        """A placement group holding one replica's shards (PACK: on one node when they fit)."""
        from ray.util.placement_group import placement_group

        c = self.cfg.cluster
        bundle = {k: v for k, v in (("CPU", c.num_cpus_per_worker), ("GPU", c.num_gpus_per_worker)) if v > 0}
        if not bundle:
            return None
        pg = placement_group([bundle] * c.shards, strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=c.placement_timeout_s)
        if not ready:
            ray.util.remove_placement_group(pg)
            raise RuntimeError(
                f"the cluster could not place a replica's {c.shards} shards of {bundle} each within "
                f"{c.placement_timeout_s:.0f}s (cluster resources: {ray.cluster_resources()}); lower "
                "cluster.replicas, cluster.shards or the per-worker resources")
        self.placement_groups.append(pg)
        return pg

    def all_actors(self) -> list:
        return [a for actors in self.shard_actors for a in actors]

    def stop_workers(self) -> None:
        try:  # peak memory and parameter bytes per worker, for the summary
            stats = ray.get([w.stats.remote() for w in self.all_actors()], timeout=30)
            self.summary["workers"] = [{k: v for k, v in st.items() if k != "parameters"} for st in stats]
        except Exception:  # noqa: BLE001 - a dead worker must not hide the job's own outcome
            pass
        for w in self.all_actors() + ([self.reducer] if self.reducer is not None else []):
            ray.kill(w)
        for pg in self.placement_groups:
            ray.util.remove_placement_group(pg)
        self.workers, self.shard_actors, self.placement_groups, self.reducer = [], [], [], None

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
        names = ray.get([a.module_names.remote(stage) for a in self.shard_actors[0]])  # per shard
        actors = self.all_actors()

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
        _drain(self.workers, chunks, lambda w, c: w.verify_pieces.remote(c), lambda _, bad: found.update(bad))
        for rel in rels:
            if rel in found:
                self.log(f"damaged, recomputing: {self.cfg.run_dir}/{rel}")
                self.damaged.append(rel)
        return found

    def _partition_rels(self, part: Partition, stages: Sequence[str]) -> list[str] | None:
        """The pieces of a done partition (index pieces of every stage and shard, docs, skipped);
        None when a marker is missing or the corpus changed under them."""
        prov = partition_provenance(part, self.duplicates.get(part.key))
        index = [index_rel(s, shard, part.key) for s in stages for shard in range(self.cfg.cluster.shards)]
        rest = [docs_rel(part.key), skipped_rel(part.key)]
        if all(self._marker_ok(r, prov) for r in index) and all(self._marker_ok(r) for r in rest):
            return index + rest
        return None

    def _done_partitions(self, parts: Sequence[Partition], rels_of) -> set[str]:
        """Keys of the partitions whose pieces (``rels_of(part)``: a list, or None when not done) are all intact."""
        planned = {p.key: rels_of(p) for p in parts}
        damaged = self._verify([r for rels in planned.values() if rels for r in rels])
        return {k for k, rels in planned.items() if rels is not None and not damaged.intersection(rels)}

    def _corpus_pass(self, parts: Sequence[Partition], todo: Sequence[Partition], desc: str, submit,
                     on_result=None) -> dict:
        """Runs ``submit(worker, partition)`` over ``todo`` with a progress bar; the corpus counts."""
        totals = {"docs": 0, "tokens": 0, "skipped": 0, "truncated": 0, "partitions": 0}
        bar = _progress(sum(len(p) for p in todo), desc, "doc", self.progress)
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

        _drain(self.workers, todo, submit, on_done, retries=self.cfg.cluster.max_restarts)
        bar.close()
        totals["skipped_total"] = write_skipped_summary(self.run, parts)
        totals["partitions_total"] = len(parts)
        totals["damaged_recomputed"] = list(self.damaged)
        totals["duplicate_ids"] = sum(len(v) for v in self.duplicates.values())
        return totals

    def index(self, parts: Sequence[Partition]) -> None:
        stages = self.stages_needed()
        done = self._done_partitions(parts, lambda p: self._partition_rels(p, stages))
        todo = [p for p in parts if p.key not in done]
        self.log(f"index: {len(parts) - len(todo)} of {len(parts)} partitions already done, {len(todo)} to go")
        self.summary["index"] = self._corpus_pass(
            parts, todo, "index", lambda w, p: w.index.remote(p, stages, self.duplicates.get(p.key)))

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
        bar = _progress(len(parts), "score", "partition", self.progress)
        merged: dict = {}

        def on_done(part: Partition, partial: dict) -> None:
            # Streaming merge: the driver holds one [Q, k] top-k per method, whatever the corpus size.
            _merge_into(merged, partial, k)
            bar.update(1)

        _drain(self.workers, parts, lambda w, p: w.score.remote(p, methods, k), on_done)
        bar.close()
        self._write_results(parts, merged)
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

    def _fused_top_k(self, rel: str) -> dict | None:
        """A scored partition's top-k (read in full: ``[Q, k]`` per method); None when damaged (then dropped)."""
        try:
            return fused_from_bytes(self.run.read_piece(rel))[0]
        except DamagedArtifact as e:
            self.log(f"damaged, recomputing: {e}")
            self.damaged.append(rel)
            self.run.invalidate(rel)
            return None

    def fused_score(self, parts: Sequence[Partition]) -> None:
        """The corpus pass and the scoring in one (``scoring.mode`` exact or fused): no index is written.

        exact: every document's exact gradient against the low-rank query factors
        (:func:`ray_influence.corpus_pass.exact_partition`); fused: its projected rows against the projected
        queries (:func:`ray_influence.corpus_pass.fused_partition`). Each partition's top-k is kept under
        ``fused/<token>/`` (:meth:`fused_token`), so a rerun for the same queries scores
        only the partitions not done yet.
        """
        stages, methods, k = self.stages_needed(), [m.value for m in self.cfg.methods], self.cfg.scoring.top_k
        token = self.fused_token()
        merged: dict = {}
        todo = []
        rest = lambda p: [docs_rel(p.key), skipped_rel(p.key)]  # noqa: E731
        done = self._done_partitions(parts, lambda p: rest(p) if self._marker_ok(
            fused_rel(token, p.key), partition_provenance(p, self.duplicates.get(p.key))) and all(
            self._marker_ok(r) for r in rest(p)) else None)
        for p in parts:
            top = self._fused_top_k(fused_rel(token, p.key)) if p.key in done else None
            if top is not None:
                offset = p.offset - p.start
                _merge_into(merged, {m: (v, r + offset) for m, (v, r) in top.items()}, k)
            else:
                todo.append(p)
        mode = self.cfg.scoring.scoring_mode.value
        self.log(f"score ({mode}): {len(parts) - len(todo)} of {len(parts)} partitions already scored for these "
                 f"queries, {len(todo)} to go; no index is written")
        task = "exact_score" if mode == ScoringMode.EXACT.value else "fused_score"
        self.summary["score_corpus"] = self._corpus_pass(
            parts, todo, f"score ({mode})",
            lambda w, p: getattr(w, task).remote(p, stages, self.duplicates.get(p.key), methods, k, token),
            lambda _, result: _merge_into(merged, result.pop("top_k"), k))
        self._write_results(parts, merged)
        self.topk = merged

    def _write_results(self, parts: Sequence[Partition], merged: dict) -> None:
        query_ids = stored_query_ids(self.run)
        offsets = [p.offset for p in parts]
        wanted: dict[int, set[int]] = defaultdict(set)
        for values, positions in merged.values():
            for pos in positions.reshape(-1).tolist():
                wanted[bisect.bisect_right(offsets, pos) - 1].add(pos)
        docs_by_position: dict[int, tuple[Any, str]] = {}
        for i, positions in wanted.items():
            part = parts[i]
            table = read_parquet_piece(self.run, docs_rel(part.key)).to_pydict()
            for d_id, text, row in zip(table["doc_id"], table["doc_text"], table["row"]):
                if part.position(row) in positions:
                    docs_by_position[part.position(row)] = (d_id, text)
        meta = run_metadata(self.cfg)
        for method, (values, positions) in merged.items():
            write_results(self.run, method, results_table(query_ids, values, positions, docs_by_position), meta)
        self.summary["score"] = {"methods": list(merged), "queries": len(query_ids), "top_k": self.cfg.scoring.top_k,
                                 "results": f"{self.cfg.run_dir}/results"}

    # ---------------------------------------------------------------- tokens

    def token_influence(self, parts: Sequence[Partition]) -> None:
        """Per-token and per-module influence of each query's top documents (part of scoring).

        Runs on the workers, which hold the models: each gets chunks of documents with the
        (method, query) pairs to explain. Writes ``token_influence/`` and ``layer_influence/``.
        """
        from .store import TOKEN_TABLES, write_method_table
        from .token_influence import DocRequest, influence_tables

        top = self.cfg.scoring.token_influence_top
        query_ids = stored_query_ids(self.run)
        offsets = [p.offset for p in parts]
        wanted: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))  # stage -> position -> pairs
        ranks: dict[tuple[str, int, int], int] = {}
        for method, (_, positions) in self.topk.items():
            stage = Method.parse(method).doc_model
            for q in range(positions.shape[0]):
                for r, pos in enumerate(positions[q, :top].tolist()):
                    wanted[stage][pos].append((method, q))
                    ranks[(method, q, pos)] = r + 1
        chunks = []
        for stage, by_pos in wanted.items():
            reqs = []
            for pos, pairs in sorted(by_pos.items()):
                part = parts[bisect.bisect_right(offsets, pos) - 1]
                reqs.append(DocRequest(part, pos - part.offset + part.start, pos, tuple(pairs)))
            size = max(1, -(-len(reqs) // (len(self.workers) * IN_FLIGHT_PER_WORKER)))
            chunks += [(stage, reqs[i:i + size]) for i in range(0, len(reqs), size)]
        terms: list = []
        token = None if self.cfg.scoring.scoring_mode.has_index else self.fused_token()
        _drain(self.workers, chunks, lambda w, c: w.token_terms.remote(*c, token),
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


def run_metadata(cfg: Config) -> dict:
    """What a result file records about its run: models, config, versions, time."""
    import platform

    import pyarrow
    import torch
    import transformers

    return {
        "pretrained_model": cfg.pretrained_model,
        "finetuned_model": cfg.finetuned_model,
        "config": cfg.to_dict(),
        "versions": {"ray_influence": __version__, "ray": ray.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "pyarrow": pyarrow.__version__,
                     "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
