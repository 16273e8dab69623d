"""The worker: one replica of the model (or of a shard's blocks) and the work it does.

:class:`Worker` is a plain class, testable without Ray; :func:`remote_worker` wraps it as
a Ray actor (a thin shell). It loads each model once, on first use, and keeps it. Large
arrays never go back to the driver: partial statistics are returned as Ray objects that
the reducer tasks consume by reference, and index pieces are written straight to the run
directory.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch

from . import attribution, ekfac
from .config import Config
from .data import Document, Partition, read_partition, read_records
from .ekfac import Fisher
from .factors_io import factors_from_bytes
from .models import load_model, load_tokenizer, parse_dtype
from .modules import ModuleSpec, find_tracked_modules
from .projection import make_projection, project_matrix
from .rundir import RunDir
from .scoring import BlockScores, Method, flatten, query_vectors, top_k
from .store import (
    IndexPieceReader,
    factors_rel,
    queries_rel,
    read_query_vectors,
    write_docs_piece,
    write_index_piece,
    write_query_vectors,
    write_skipped_piece,
)
from .tokens import Example, tokenize_document, tokenize_prompt_completion


TEST_DELAY_ENV = "RAY_INFLUENCE_TEST_INDEX_DELAY_S"
"""Test-only: seconds each index task sleeps first, so a test can kill a run mid-index."""
CRASH_ONCE_ENV = "RAY_INFLUENCE_TEST_CRASH_ONCE"
"""Test-only: a flag-file path; the first index task to find it missing creates it and
kills its worker process, so a test sees an actor die mid-index exactly once."""
TEST_ENVS = (TEST_DELAY_ENV, CRASH_ONCE_ENV)


def partition_provenance(part: Partition, drop: dict[int, str] | None) -> dict:
    """What an index piece of ``part`` was computed from: the file's fingerprint, dropped rows."""
    return {"fingerprint": part.file.fingerprint, "dropped": sorted(int(r) for r in (drop or {}))}


def pick_device(num_gpus: float) -> torch.device:
    """The device Ray gave this process: CUDA when it was assigned a GPU, else the CPU."""
    if num_gpus and torch.cuda.is_available():
        return torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")


class Worker:
    """Holds the models of one replica / shard and runs passes over its share of the data.

    Args:
        cfg: the job config.
        shard: this worker's shard number (0 when ``cluster.shards`` is 1).
        blocks: the decoder blocks this worker owns; all when None.
    """

    def __init__(self, cfg: Config, shard: int = 0, blocks: range | None = None):
        self.cfg = cfg
        self.shard = shard
        self.blocks = blocks
        self.device = pick_device(cfg.cluster.num_gpus_per_worker)
        self.run = RunDir(cfg.run_dir)
        self._models: dict[str, torch.nn.Module] = {}
        self._tokenizers: dict[str, Any] = {}
        self._specs: dict[str, dict[str, ModuleSpec]] = {}
        self._file_cache: dict = {}
        self._ft_records: list[dict] | None = None
        self._queries_cache: tuple[str, dict] | None = None
        self._piece_reader: IndexPieceReader | None = None
        if cfg.cluster.num_cpus_per_worker >= 1 and self.device.type == "cpu":
            torch.set_num_threads(int(cfg.cluster.num_cpus_per_worker))

    def stats(self) -> dict:
        """This worker's process id, peak resident memory and the parameter bytes it holds."""
        import resource

        params = sum(p.numel() * p.element_size() for m in self._models.values() for p in m.parameters())
        return {"pid": os.getpid(), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "param_bytes": params, "device": str(self.device)}

    # ------------------------------------------------------------------ models

    def _model_path(self, stage: str) -> str:
        return self.cfg.pretrained_model if stage == "pretrained" else self.cfg.finetuned_model

    def model(self, stage: str) -> torch.nn.Module:
        if stage not in self._models:
            m = self.cfg.model
            self._models[stage] = load_model(
                self._model_path(stage), m.dtype, self.device, m.trust_remote_code, m.allow_pickle
            )
        return self._models[stage]

    def tokenizer(self, stage: str):
        if stage not in self._tokenizers:
            self._tokenizers[stage] = load_tokenizer(self._model_path(stage), self.cfg.model.trust_remote_code)
        return self._tokenizers[stage]

    def specs(self, stage: str) -> dict[str, ModuleSpec]:
        if stage not in self._specs:
            mods = self.cfg.modules
            self._specs[stage] = find_tracked_modules(self.model(stage), mods.include, mods.exclude, self.blocks)
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

    # ------------------------------------------------------------------ fit

    def _fisher(self) -> Fisher:
        return Fisher.parse(self.cfg.ekfac.fisher)

    def covariance(self, stage: str, share: Sequence) -> dict[str, ekfac.CovarianceStats]:
        """Partial A and G sums over this worker's share of the factor sample."""
        e = self.cfg.ekfac
        examples = self._share_examples(stage, share)
        if not examples:
            return {n: None for n in self.specs(stage)}
        return attribution.covariance_pass(
            self.model(stage), examples, self.specs(stage), self._fisher(), e.fisher_samples, e.seed,
            self.cfg.cluster.max_tokens_per_batch,
        )

    def eigendecompose(self, stats: ekfac.CovarianceStats) -> ekfac.Eigenbasis:
        """float64 eigendecomposition of one module's merged A and G (a reducer task)."""
        return ekfac.eigenbasis(stats)

    def lambdas(self, stage: str, share: Sequence, names: Sequence[str], *bases: ekfac.Eigenbasis) -> dict:
        """Partial Λ sums over this worker's share, in the reduced eigenbases."""
        e = self.cfg.ekfac
        examples = self._share_examples(stage, share)
        if not examples:
            return {n: None for n in names}
        return attribution.lambda_pass(
            self.model(stage), examples, self.specs(stage), dict(zip(names, bases)), self._fisher(),
            e.fisher_samples, e.seed, self.cfg.cluster.max_tokens_per_batch,
        )

    # ---------------------------------------------------------------- index

    def index(self, part: Partition, stages: Sequence[str], drop: dict[int, str] | None = None) -> dict:
        """Projected gradients of one partition at each of ``stages``' models, written to the run dir.

        Args:
            drop: rows within the file to skip (duplicate ids), with their reason.
        """
        t0 = time.perf_counter()
        if TEST_DELAY_ENV in os.environ:  # test-only: widens the window for fault-injection tests
            time.sleep(float(os.environ[TEST_DELAY_ENV]))
        if CRASH_ONCE_ENV in os.environ and not os.path.exists(os.environ[CRASH_ONCE_ENV]):
            open(os.environ[CRASH_ONCE_ENV], "w").close()  # test-only: die once, mid-index
            os._exit(1)
        docs, skipped = self.corpus_documents(part, drop)
        examples = self.corpus_examples(docs)
        keep = torch.ones(len(docs), dtype=torch.bool)
        flats = {}
        for stage in stages:
            specs = self.specs(stage)
            flat = torch.zeros(len(docs), index_width(specs, self.cfg.projection.dim))
            if examples:
                grads = attribution.document_gradients(
                    self.model(stage), examples, specs, self.projections(stage), self.cfg.cluster.max_tokens_per_batch
                )
                got = set(grads.keys)  # rows with a non-finite forward are missing
                rows = [i for i, e in enumerate(examples) if e.key in got]
                computed = flatten(grads.grads, list(specs))
                flat = flat.to(computed.dtype)
                flat[rows] = computed
                finite = torch.zeros(len(docs), dtype=torch.bool)
                finite[rows] = torch.isfinite(flat[rows]).all(dim=1)
                keep &= finite
            flats[stage] = flat
        skipped += [(docs[j].doc_id, "non_finite_gradient") for j in (~keep).nonzero(as_tuple=True)[0].tolist()]
        kept = keep.nonzero(as_tuple=True)[0].tolist()
        kept_docs = [docs[i] for i in kept]
        for stage in stages:
            write_index_piece(self.run, stage, self.shard, part, kept_docs, flats[stage][keep],
                              parse_dtype(self.cfg.projection.dtype), partition_provenance(part, drop))
        write_docs_piece(self.run, part, kept_docs, [examples[i] for i in kept], self.cfg.scoring.doc_text_chars)
        write_skipped_piece(self.run, part, skipped)
        return {
            "partition": part.key,
            "docs": len(kept_docs),
            "skipped": len(skipped),
            "tokens": sum(len(examples[i]) for i in kept),
            "truncated": sum(examples[i].truncated for i in kept),
            "seconds": time.perf_counter() - t0,
        }

    # --------------------------------------------------------------- queries

    def queries(self, methods: Sequence[str]) -> dict:
        """Query gradients at θ_ft, preconditioned per method, projected; written to the run dir."""
        q = self.cfg.queries
        recs = read_records(q.path, [q.id_column, q.prompt_column, q.completion_column])
        if not recs:
            raise ValueError(f"queries {q.path!r} hold no rows")
        tok = self.tokenizer("finetuned")
        ids = [r[q.id_column] for r in recs]
        if len(set(map(str, ids))) != len(ids):
            raise ValueError(f"queries {q.path!r}: duplicate query ids")
        examples = [
            tokenize_prompt_completion(tok, str(r[q.id_column]), r[q.prompt_column] or "",
                                       r[q.completion_column] or "", q.max_length, add_eos=False)
            for r in recs
        ]
        specs = self.specs("finetuned")
        names = list(specs)
        grads = attribution.document_gradients(self.model("finetuned"), examples, specs, None,
                                               self.cfg.cluster.max_tokens_per_batch).grads
        factors = {}
        for stage in ("finetuned", "pretrained"):
            rel = factors_rel(stage, self.shard)
            if self.run.piece_done(rel):
                factors[stage] = factors_from_bytes(self.run.read_piece(rel))[0]
        projs = self.projections("finetuned")
        vectors = {}
        for m in methods:
            method = Method.parse(m)
            missing = [s for s in method.needs_factors if s not in factors]
            if missing:
                raise RuntimeError(f"method {method.value} needs {missing} factors; run the fit stage first")
            u = query_vectors(method, grads, factors.get("finetuned"), factors.get("pretrained"))
            if projs is not None:
                u = {n: project_matrix(u[n], projs[n]) for n in names}
            vectors[method.value] = flatten(u, names)
        write_query_vectors(self.run, self.shard, ids, recs, q, vectors)
        return {"queries": len(ids), "methods": list(vectors)}

    # ----------------------------------------------------------------- score

    def token_terms(self, stage: str, requests: Sequence) -> list:
        """Per-token and per-module terms of top documents (:mod:`ray_influence.token_influence`)."""
        from .token_influence import worker_token_terms

        return worker_token_terms(self, stage, requests)

    def _query_vectors(self) -> dict:
        marker = self.run.piece_done(queries_rel(self.shard))
        token = marker["sha256"] if marker else None
        if self._queries_cache is None or self._queries_cache[0] != token:
            self._queries_cache = (token, read_query_vectors(self.run, self.shard))
        return self._queries_cache[1]

    def partial_scores(self, part: Partition, methods: Sequence[str]) -> tuple[dict, torch.Tensor]:
        """This shard's partial scores of one partition (summed over shards later).

        Each index piece is streamed once (:class:`~ray_influence.store.IndexPieceReader`:
        read and checksum in a background thread, overlapped with the matmuls), however
        many methods score against it.

        Returns:
            ``({method: (scores [Q, N] float64, sqnorm [N])}, rows within the file [N])``.
        """
        qv = self._query_vectors()
        by_stage: dict[str, list[str]] = {}
        for m in methods:
            method = Method.parse(m)
            by_stage.setdefault(method.doc_model, []).append(method.value)
        if self._piece_reader is None:
            self._piece_reader = IndexPieceReader(self.run)
        out, rows = {}, None
        for stage, names in by_stage.items():
            block_scores = BlockScores({m: qv["vectors"][m] for m in names})
            sqnorm, rows = self._piece_reader.scan(stage, self.shard, part, block_scores.add)
            out.update({m: (s, sqnorm) for m, s in block_scores.result().items()})
        order = [Method.parse(m).value for m in methods]
        return {m: out[m] for m in order}, rows  # every stage's piece holds the same rows

    def score(self, part: Partition, methods: Sequence[str], k: int) -> dict:
        """Top-k of one partition per method: ``{method: (values [Q, k'], global positions [Q, k'])}``.

        With one shard the partial scores are the scores; cosine scores divide by the
        query's and document's full norms.
        """
        partial, rows = self.partial_scores(part, methods)
        qv = self._query_vectors()
        positions = rows + (part.offset - part.start)  # this run's global positions
        out = {}
        for m, (s, sqnorm) in partial.items():
            if Method.parse(m).cosine:
                qn = qv["vectors"][m].to(torch.float64).square().sum(1).sqrt()
                s = s / (qn[:, None] * sqnorm.sqrt()[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
            out[m] = top_k(s, k, positions)
        return out


def index_width(specs: dict[str, ModuleSpec], dim: int) -> int:
    """Columns of a flat index row: ``sum_m k^2``, or ``sum_m d_out d_in'`` when exact."""
    return sum(dim * dim if dim else s.d_out * s.d_in_aug for s in specs.values())


def remote_worker(cfg: Config, shard: int = 0, blocks: range | None = None):
    """Starts a :class:`Worker` as a Ray actor with the config's resources."""
    import ray

    c = cfg.cluster
    env = {k: os.environ[k] for k in TEST_ENVS if k in os.environ}
    actor_cls = ray.remote(Worker).options(
        num_cpus=c.num_cpus_per_worker, num_gpus=c.num_gpus_per_worker,
        max_restarts=c.max_restarts, max_task_retries=c.max_restarts,
        **({"runtime_env": {"env_vars": env}} if env else {}),
    )
    return actor_cls.remote(cfg, shard, blocks)
