"""What one shard of a replica holds: its models, its data readers and its stored queries.

A :class:`ShardHost` lives in one worker process (a Ray actor, or the test's own
process). It loads each model once, on first use, and keeps it: the whole causal LM, or
with ``cluster.shards: S > 1`` this shard's contiguous range of decoder blocks
(:mod:`ray_influence.shard_model`). It has no notion of peers: the replicas
(:mod:`ray_influence.replica`) run passes over it, and the per-shard steps
(:mod:`ray_influence.shard_steps`) read and write through it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .config import Config, ScoringMode
from .data import Document, Partition, read_partition, read_records
from .factors_io import factors_from_bytes
from .models import load_model, load_model_shard, load_tokenizer
from .modules import ModuleSpec, find_tracked_modules
from .projection import make_projection
from .rundir import RunDir
from .scoring import Method
from .store import IndexPieceReader, factors_rel, queries_rel, read_query_factors, read_query_vectors
from .tokens import Example, tokenize_document, tokenize_prompt_completion


def pick_device(num_gpus: float) -> torch.device:
    """The device Ray gave this process: CUDA when it was assigned a GPU, else the CPU."""
    if num_gpus and torch.cuda.is_available():
        return torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")


def module_of(model) -> torch.nn.Module:
    """The ``nn.Module`` of a whole model or of a :class:`~ray_influence.shard_model.ShardModel`."""
    return getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model


class StoredQueries:
    """This shard's stored query piece, read once per piece (keyed by its marker's sha256)."""

    def __init__(self, run: RunDir, shard: int):
        self.run, self.shard = run, shard
        self._cache: tuple[tuple, dict] | None = None

    def _read(self, reader) -> dict:
        marker = self.run.piece_done(queries_rel(self.shard))
        key = (reader.__name__, marker["sha256"] if marker else None)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, reader(self.run, self.shard))
        return self._cache[1]

    def factors(self) -> dict:
        """Stored low-rank query factors (exact mode): ``{"ids", "factors": {method: {module: QueryFactors}}}``."""
        return self._read(read_query_factors)

    def vectors(self) -> dict:
        """Stored projected (or exact-index) query vectors (modes index and fused): ``{"ids", "vectors": {method: [Q, D]}}``."""
        return self._read(read_query_vectors)

    def count(self, method: str) -> int:
        """How many queries the stored factors of ``method`` hold."""
        per = self.factors()["factors"][Method.parse(method).value]
        return next(iter(per.values())).left.shape[0] if per else len(self.factors()["ids"])


class ShardHost:
    """The models, data and stored queries of one shard (the whole model when unsharded).

    Args:
        cfg: the job config.
        shard: this shard's number (0 when ``cluster.shards`` is 1).
        layout: ``(blocks, first, last)`` of this shard; None for a whole model.

    Attributes:
        held: arrays a pass left on this shard until a later step takes them (index rows
            under the pass's session id, query blocks under the stage's key).
    """

    def __init__(self, cfg: Config, shard: int = 0, layout: tuple[range, bool, bool] | None = None):
        self.cfg = cfg
        self.shard = shard
        self.layout = layout
        self.blocks = layout[0] if layout is not None else None
        self.device = pick_device(cfg.cluster.num_gpus_per_worker)
        self.run = RunDir(cfg.run_dir)
        self.queries = StoredQueries(self.run, shard)
        self.held: dict[str, Any] = {}
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._specs: dict[str, dict[str, ModuleSpec]] = {}
        self._file_cache: dict = {}
        self._ft_records: list[dict] | None = None
        self._piece_reader: IndexPieceReader | None = None
        if cfg.cluster.num_cpus_per_worker >= 1 and self.device.type == "cpu":
            torch.set_num_threads(int(cfg.cluster.num_cpus_per_worker))

    @property
    def exact(self) -> bool:
        """``scoring.mode: exact``: queries are low-rank factors and there are no projected rows."""
        return self.cfg.scoring.scoring_mode is ScoringMode.EXACT

    def stats(self) -> dict:
        """This process's id, peak resident memory and the parameter bytes it holds."""
        import resource

        params = sum(p.numel() * p.element_size() for m in self._models.values()
                     for p in module_of(m).parameters() if not p.is_meta)
        owned = sorted({n for m in self._models.values() for n, p in module_of(m).named_parameters(
            remove_duplicate=False) if not p.is_meta})
        return {"pid": os.getpid(), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "param_bytes": params, "device": str(self.device), "shard": self.shard,
                "blocks": [self.blocks.start, self.blocks.stop] if self.blocks is not None else None,
                "parameters": owned}

    # ------------------------------------------------------------------ models

    def model_path(self, stage: str) -> str:
        return self.cfg.pretrained_model if stage == "pretrained" else self.cfg.finetuned_model

    def model(self, stage: str):
        """The stage's frozen model: a whole causal LM, or this shard's :class:`ShardModel`."""
        if stage not in self._models:
            m = self.cfg.model
            if self.layout is None:
                self._models[stage] = load_model(
                    self.model_path(stage), m.dtype, self.device, m.trust_remote_code, m.allow_pickle
                )
            else:
                blocks, first, last = self.layout
                self._models[stage] = load_model_shard(
                    self.model_path(stage), blocks, first, last, m.dtype, self.device, m.trust_remote_code
                )
        return self._models[stage]

    def tokenizer(self, stage: str):
        if stage not in self._tokenizers:
            self._tokenizers[stage] = load_tokenizer(self.model_path(stage), self.cfg.model.trust_remote_code)
        return self._tokenizers[stage]

    def specs(self, stage: str) -> dict[str, ModuleSpec]:
        """This shard's tracked modules of the stage's model."""
        if stage not in self._specs:
            mods = self.cfg.modules
            self._specs[stage] = find_tracked_modules(module_of(self.model(stage)), mods.include, mods.exclude,
                                                      self.blocks)
        return self._specs[stage]

    def module_names(self, stage: str = "pretrained") -> list[str]:
        return list(self.specs(stage))

    def projections(self, stage: str):
        """``{module: Projection}`` of this shard's modules; None without projection (``projection.dim: 0``)."""
        dim = self.cfg.projection.dim
        if dim == 0:
            return None
        return {n: make_projection(s, dim, self.cfg.projection.seed) for n, s in self.specs(stage).items()}

    def piece_reader(self) -> IndexPieceReader:
        """The streaming reader of this shard's index pieces (its buffer is reused)."""
        if self._piece_reader is None:
            self._piece_reader = IndexPieceReader(self.run)
        return self._piece_reader

    def fit_factors(self, methods: Sequence[str]) -> dict:
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

    def share_examples(self, stage: str, share: Sequence) -> list[Example]:
        """The examples of a factor-sample share.

        ``share``: for 'pretrained', ``[(Partition, [row offsets])]``; for 'finetuned', row numbers.
        """
        if stage == "finetuned":
            return self.finetune_examples(share)
        out = []
        for part, rows in share:
            docs, _ = self.corpus_documents(part)
            wanted = set(int(part.offset + r) for r in rows)
            out += self.corpus_examples([d for d in docs if d.position in wanted])
        return out
