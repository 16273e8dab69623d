"""The job's YAML config: one frozen dataclass per section, validated (DESIGN.md §4).

Unknown keys and wrong types are errors that name the key's full path and what was
expected; every field carries a help string (``field(metadata={"help": ...})``), which
``ray-influence config-help`` prints.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from .ekfac import Fisher
from .scoring import Method


class ConfigError(ValueError):
    """A config the user wrote is invalid (exit code 2)."""


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CorpusConfig:
    path: str = _f(help="pre-training corpus: a file, a directory or a glob of Parquet/JSONL/Arrow (any fsspec URL)")
    text_column: str = _f("text", "column holding the document text")
    id_column: str = _f("doc_id", "column holding the document id (its type is kept in the results)")
    max_length: int = _f(512, "tokens per document; longer documents are truncated and counted")
    partition_docs: int = _f(10000, "documents per index partition (the unit of work, resume and growth)")


@dataclass(frozen=True)
class FinetuneDataConfig:
    path: str = _f(help="fine-tuning data (prompt/completion rows), a file, directory or glob")
    prompt_column: str = _f("prompt", "column holding the prompt")
    completion_column: str = _f("completion", "column holding the completion (the loss covers it and EOS)")
    max_length: int = _f(512, "tokens per example; the prompt is cut from the left first")


@dataclass(frozen=True)
class QueriesConfig:
    path: str = _f(help="queries (id/prompt/completion rows) answered by the fine-tuned model")
    id_column: str = _f("query_id", "column holding the query id")
    prompt_column: str = _f("prompt", "column holding the prompt")
    completion_column: str = _f("completion", "column holding the answer to attribute")
    max_length: int = _f(512, "tokens per query; the prompt is cut from the left first")


@dataclass(frozen=True)
class ModulesConfig:
    include: list = _f(factory=lambda: ["*"], help="glob patterns of tracked module names")
    exclude: list = _f(factory=lambda: ["lm_head", "*embed*"], help="glob patterns never tracked")


DEFAULT_QUERY_RANK = 16
"""Rank of the query factors in ``scoring.mode: exact`` (docs/BENCHMARKS.md, exact scoring)."""

DEFAULT_DAMPING = "auto*0.1"
"""Each stage's damping unless the config says otherwise: 0.01 x mean(Λ) per module. Chosen,
with :data:`DEFAULT_FISHER`, on the default exact pass over the tuning worlds of
``ray_influence.world.WORLD_FAMILY`` by the best worst case against each world's own best
(docs/BENCHMARKS.md, "Defaults chosen on the exact path"; ``jobs/bench_defaults.py``)."""

DEFAULT_FISHER = "empirical"
"""The Fisher of both stages' EK-FAC unless the config says otherwise (see :data:`DEFAULT_DAMPING`):
the empirical Fisher beat the true one (1 or 4 label samples) on 8 of 9 worlds there."""


@dataclass(frozen=True)
class EkfacConfig:
    fisher: Union[bool, str] = _f(DEFAULT_FISHER, "'empirical' (the default: the data's labels; docs/BENCHMARKS.md, "
                                                  "defaults chosen on the exact path) or true (labels sampled from "
                                                  "the model: the true Fisher)")
    fisher_samples: int = _f(4, "labels sampled per position when fisher is true (ignored by 'empirical')")
    covariance_max_docs: int = _f(10000, "documents (a seeded sample) behind the pre-training factors; also caps the fine-tuning set")
    damping: Union[str, float, dict] = _f(DEFAULT_DAMPING, "'auto' (0.1 x mean Λ per module), 'auto*C' (C x that; the default "
                                                      "'auto*0.1' is 0.01 x mean Λ: docs/BENCHMARKS.md, defaults chosen "
                                                      "on the exact path), a float, or {pretrained: .., finetuned: ..} "
                                                      "of those")
    seed: int = _f(0, "seed of the covariance sample and of label sampling")

    def damping_for(self, stage: str) -> Union[str, float]:
        """The damping spec of ``stage`` ('pretrained' or 'finetuned')."""
        if isinstance(self.damping, dict):
            return self.damping.get(stage, DEFAULT_DAMPING)
        return self.damping


@dataclass(frozen=True)
class ProjectionConfig:
    dim: int = _f(32, "projection dimension k per side (k x k per module); 0 = exact gradients (small models only)")
    seed: int = _f(0, "seed of the projection matrices (with the module name)")
    dtype: str = _f("float32", "storage dtype of the index: float32, bfloat16, float16 or float64")


@dataclass(frozen=True)
class ScoringConfig:
    methods: list = _f(factory=lambda: ["multi_stage"], help=f"any of {[m.value for m in Method]}")
    top_k: int = _f(100, "documents kept per query and method")
    doc_text_chars: int = _f(2000, "characters of doc_text stored in the results")
    token_influence_top: int = _f(10, "top documents per query and method whose per-token and per-layer "
                                      "influence is stored (token_influence/, layer_influence/); 0 disables")
    mode: str = _f("exact", "how the corpus is scored: 'exact' (each document's exact gradient against rank-"
                            "query_rank factors of the preconditioned queries, during the corpus pass, no index; "
                            "the default), 'index' (a reusable projected index at projection.dim, then a cheap "
                            "score stage) or 'fused' (the projected rows scored during the corpus pass, no index). "
                            "The projected modes keep Spearman ~0.3 (multi_stage) / ~0.6 (single_stage) of the exact "
                            "ranking at dim 32: README, scoring modes")
    query_rank: int = _f(DEFAULT_QUERY_RANK, "scoring.mode exact: rank of each module's truncated SVD of the "
                                             "preconditioned query (0 = full rank, exact); clipped to "
                                             "min(d_out, d_in') per module")
    query_block: int = _f(0, "queries whose exact gradients and preconditioned vectors the query stage holds at "
                             "once (per worker); 0 = as many as fit in 1 GiB (README, scoring modes: memory)")

    @property
    def scoring_mode(self) -> "ScoringMode":
        return ScoringMode.parse(self.mode)


class ScoringMode(str, enum.Enum):
    """How the corpus is scored (README, scoring modes)."""

    EXACT = "exact"  # exact document gradients against low-rank queries, in the corpus pass
    INDEX = "index"  # a projected index, then a score stage over it
    FUSED = "fused"  # projected rows scored in the corpus pass, no index

    @classmethod
    def parse(cls, value: object) -> "ScoringMode":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown scoring mode {value!r}; expected one of {tuple(m.value for m in cls)}") from None

    @property
    def has_index(self) -> bool:
        return self is ScoringMode.INDEX


@dataclass(frozen=True)
class ModelConfig:
    dtype: str = _f("float32", "dtype the models run in: float32, float64, bfloat16 or float16")
    trust_remote_code: bool = _f(False, "allow model directories with custom code")
    allow_pickle: bool = _f(False, "allow pickle (.bin) weights instead of safetensors only")


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int = _f(2, "data-parallel workers over corpus partitions")
    shards: int = _f(1, "model shards per replica (contiguous ranges of decoder blocks)")
    num_cpus_per_worker: float = _f(1, "Ray CPUs per worker actor")
    num_gpus_per_worker: float = _f(0, "Ray GPUs per worker actor (the device follows Ray's assignment)")
    max_tokens_per_batch: int = _f(4096, "padded tokens per micro-batch")
    max_restarts: int = _f(3, "times a dead worker actor is restarted (partitions are retried)")
    placement_timeout_s: float = _f(600, "seconds to wait for the cluster to place one replica's shards "
                                          "(a placement group) before failing")
    num_cpus_per_reducer: float = _f(0, "Ray CPUs reserved by the reducer actor that merges partial sums (0: it runs beside the workers)")


@dataclass(frozen=True)
class Config:
    run_dir: str = _f(help="fsspec URL where every artifact and result lives")
    pretrained_model: str = _f(help="HF model directory of the pre-trained model θ_pt")
    finetuned_model: str = _f(help="HF model directory of the fine-tuned model θ_ft")
    corpus: CorpusConfig = _f(help="the pre-training corpus")
    finetune_data: FinetuneDataConfig = _f(help="the fine-tuning data (for H_ft)")
    queries: QueriesConfig = _f(help="the queries to attribute")
    modules: ModulesConfig = _f(factory=ModulesConfig, help="tracked modules")
    ekfac: EkfacConfig = _f(factory=EkfacConfig, help="curvature")
    projection: ProjectionConfig = _f(factory=ProjectionConfig, help="corpus index projection")
    scoring: ScoringConfig = _f(factory=ScoringConfig, help="scoring")
    model: ModelConfig = _f(factory=ModelConfig, help="model loading")
    cluster: ClusterConfig = _f(factory=ClusterConfig, help="Ray resources")

    @property
    def methods(self) -> list[Method]:
        return [Method.parse(m) for m in self.scoring.methods]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    return {list: "list of strings"}.get(tp, getattr(tp, "__name__", str(tp)))


def _build(cls: type, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"unknown key {where!r}; expected one of {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {key!r} ({f.metadata.get('help', '')})")
            continue
        value, tp = data[name], hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        elif not _type_ok(value, tp):
            raise ConfigError(f"{key!r}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key!r} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")


def _validate(cfg: Config) -> None:
    from .ekfac import resolve_damping
    from .models import DTYPES

    for key, value in [
        ("corpus.max_length", cfg.corpus.max_length),
        ("corpus.partition_docs", cfg.corpus.partition_docs),
        ("finetune_data.max_length", cfg.finetune_data.max_length),
        ("queries.max_length", cfg.queries.max_length),
        ("ekfac.fisher_samples", cfg.ekfac.fisher_samples),
        ("ekfac.covariance_max_docs", cfg.ekfac.covariance_max_docs),
        ("scoring.top_k", cfg.scoring.top_k),
        ("cluster.replicas", cfg.cluster.replicas),
        ("cluster.shards", cfg.cluster.shards),
        ("cluster.max_tokens_per_batch", cfg.cluster.max_tokens_per_batch),
        ("cluster.placement_timeout_s", cfg.cluster.placement_timeout_s),
    ]:
        _positive(key, value)
    _positive("projection.dim", cfg.projection.dim, allow_zero=True)
    _positive("scoring.token_influence_top", cfg.scoring.token_influence_top, allow_zero=True)
    _positive("scoring.query_rank", cfg.scoring.query_rank, allow_zero=True)
    _positive("scoring.query_block", cfg.scoring.query_block, allow_zero=True)
    try:
        cfg.scoring.scoring_mode
    except ValueError as e:
        raise ConfigError(f"'scoring.mode': {e}") from None
    _positive("cluster.num_cpus_per_worker", cfg.cluster.num_cpus_per_worker, allow_zero=True)
    _positive("cluster.num_gpus_per_worker", cfg.cluster.num_gpus_per_worker, allow_zero=True)
    _positive("cluster.max_restarts", cfg.cluster.max_restarts, allow_zero=True)
    _positive("cluster.num_cpus_per_reducer", cfg.cluster.num_cpus_per_reducer, allow_zero=True)
    try:
        Fisher.parse(cfg.ekfac.fisher)
    except ValueError as e:
        raise ConfigError(f"'ekfac.fisher': {e}") from None
    if cfg.ekfac.fisher is False:
        raise ConfigError("'ekfac.fisher': false is ambiguous; write 'empirical' for the data's labels")
    if isinstance(cfg.ekfac.damping, dict):
        unknown = sorted(set(cfg.ekfac.damping) - {"pretrained", "finetuned"})
        if unknown:
            raise ConfigError(f"unknown key 'ekfac.damping.{unknown[0]}'; expected one of ['finetuned', 'pretrained']")
    for stage in ("pretrained", "finetuned"):
        spec = cfg.ekfac.damping_for(stage)
        try:
            import torch

            resolve_damping(torch.ones(1), spec)
        except ValueError as e:
            raise ConfigError(f"'ekfac.damping' ({stage}): {e}") from None
    if not cfg.scoring.methods:
        raise ConfigError("'scoring.methods' is empty; expected some of " + str([m.value for m in Method]))
    for m in cfg.scoring.methods:
        try:
            Method.parse(m)
        except ValueError as e:
            raise ConfigError(f"'scoring.methods': {e}") from None
    if len(set(cfg.scoring.methods)) != len(cfg.scoring.methods):
        raise ConfigError(f"'scoring.methods' lists a method twice: {cfg.scoring.methods}")
    for key, value in [("model.dtype", cfg.model.dtype), ("projection.dtype", cfg.projection.dtype)]:
        if value not in DTYPES:
            raise ConfigError(f"{key!r}: unknown dtype {value!r}; expected one of {tuple(DTYPES)}")
    if not cfg.modules.include:
        raise ConfigError("'modules.include' is empty: no module would be tracked")


def config_from_dict(data: Any) -> Config:
    """Builds and validates a :class:`Config`; raises :class:`ConfigError` naming the key."""
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg


def load_config(path: str) -> Config:
    """Reads a YAML config (local path or fsspec URL)."""
    import fsspec

    try:
        with fsspec.open(path, "r") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    return config_from_dict(data)


def describe() -> str:
    """Every key with its default and help, as YAML-ish text."""
    lines = []

    def walk(cls: type, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"{indent}{f.name}:  # {f.metadata.get('help', '')}")
                walk(tp, indent + "  ")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "<required>"
            lines.append(f"{indent}{f.name}: {json.dumps(default) if default != '<required>' else default}"
                         f"  # {f.metadata.get('help', '')}")

    walk(Config, "")
    return "\n".join(lines)
