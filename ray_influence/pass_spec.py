"""What one pass of a replica collects: a small frozen spec, and the collector it makes on a shard.

A pass runs a list of examples through a replica's model (every shard of it) into one
collector per shard. :class:`PassSpec` names the pass with fields, not positional
arguments: it travels unchanged from the replica's head to its peers, and each shard
turns it into its own :class:`~ray_influence.attribution.PassPlan` over its own tracked
modules (:func:`plan_for`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from . import attribution
from .attribution import PassPlan
from .collectors import QueryScoreCollector
from .ekfac import Fisher
from .lowrank import QueryFactors
from .scoring import Method
from .store import QUERY_FACTOR_FIELDS

if TYPE_CHECKING:
    from .shard_host import ShardHost


class PassKind(str, enum.Enum):
    COVARIANCE = "covariance"  # A and G sums (fit)
    LAMBDA = "lambda"  # Λ sums in the reduced eigenbases (fit)
    GRADIENTS = "gradients"  # per-document gradients: projected (corpus) or exact (queries)
    SCORES = "scores"  # exact gradients contracted with the low-rank query factors (exact mode)
    TERMS = "terms"  # per-token, per-module terms of one document (token influence)


CORPUS_KINDS = (PassKind.GRADIENTS, PassKind.SCORES)
"""Kinds of the passes that take per-document gradients (where the peer fault point sits)."""


@dataclass(frozen=True)
class PassSpec:
    """One pass of a replica, the same on every shard.

    Attributes:
        kind: what the shards collect.
        stage: ``pretrained`` or ``finetuned``: whose model runs.
        projected: ``gradients``: project them (corpus passes) or keep them exact (queries).
        bases: ``lambda``: per shard, ``{module: Eigenbasis or its Ray object ref}``; each
            shard resolves only its own.
        methods: ``scores``: the methods whose stored query factors the documents meet,
            one after another.
        pairs: ``terms``: the ``(method, query index)`` pairs whose stored vectors to use.
    """

    kind: PassKind
    stage: str
    projected: bool = False
    bases: tuple[Mapping[str, Any], ...] = ()
    methods: tuple[str, ...] = ()
    pairs: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PassKind(self.kind))
        if self.stage not in ("pretrained", "finetuned"):
            raise ValueError(f"a pass runs the pretrained or finetuned model, not {self.stage!r}")
        need = {PassKind.LAMBDA: ("bases", self.bases), PassKind.SCORES: ("methods", self.methods),
                PassKind.TERMS: ("pairs", self.pairs)}
        if self.kind in need and not need[self.kind][1]:
            raise ValueError(f"a {self.kind.value} pass needs {need[self.kind][0]}")

    @classmethod
    def covariance(cls, stage: str) -> "PassSpec":
        return cls(PassKind.COVARIANCE, stage)

    @classmethod
    def lambdas(cls, stage: str, bases: Sequence[Mapping[str, Any]]) -> "PassSpec":
        return cls(PassKind.LAMBDA, stage, bases=tuple(bases))

    @classmethod
    def gradients(cls, stage: str, projected: bool) -> "PassSpec":
        return cls(PassKind.GRADIENTS, stage, projected=projected)

    @classmethod
    def scores(cls, stage: str, methods: Sequence[str]) -> "PassSpec":
        return cls(PassKind.SCORES, stage, methods=tuple(Method.parse(m).value for m in methods))

    @classmethod
    def terms(cls, stage: str, pairs: Sequence[tuple[str, int]]) -> "PassSpec":
        return cls(PassKind.TERMS, stage, pairs=tuple((Method.parse(m).value, int(q)) for m, q in pairs))

    @property
    def corpus(self) -> bool:
        """Whether the pass takes per-document gradients (a corpus or query pass)."""
        return self.kind in CORPUS_KINDS


def plan_for(spec: PassSpec, host: "ShardHost") -> PassPlan:
    """The collector of ``spec`` over ``host``'s own tracked modules (its shard's)."""
    e, specs, fisher = host.cfg.ekfac, host.specs(spec.stage), Fisher.parse(host.cfg.ekfac.fisher)
    if spec.kind is PassKind.COVARIANCE:
        return attribution.covariance_plan(specs, fisher, e.fisher_samples)
    if spec.kind is PassKind.LAMBDA:
        return attribution.lambda_plan(resolve(spec.bases[host.shard]), fisher, e.fisher_samples)
    if spec.kind is PassKind.GRADIENTS:
        return attribution.gradient_plan(specs, host.projections(spec.stage) if spec.projected else None)
    if spec.kind is PassKind.SCORES:
        return PassPlan(QueryScoreCollector(pass_factors(host.queries.factors()["factors"], spec.methods)))
    from .token_influence import TERM_DTYPE, TokenTermCollector, split_flat

    if host.exact:
        qf = host.queries.factors()["factors"]
        vectors = {n: (torch.cat([qf[m][n].left[q:q + 1] for m, q in spec.pairs]),
                       torch.cat([qf[m][n].right[q:q + 1] for m, q in spec.pairs])) for n in specs}
        return PassPlan(TokenTermCollector(vectors, None))
    qv, dim = host.queries.vectors()["vectors"], host.cfg.projection.dim
    flat = torch.stack([qv[m][q].to(TERM_DTYPE) for m, q in spec.pairs])  # [R, D]
    shapes = {n: (dim, dim) if dim else s.shape for n, s in specs.items()}
    return PassPlan(TokenTermCollector(split_flat(flat, shapes), host.projections(spec.stage)))


def pass_factors(qf: Mapping[str, Mapping[str, QueryFactors]], methods: Sequence[str]) -> dict[str, QueryFactors]:
    """``{module: QueryFactors}`` of every (method, query) pair of ``methods``, methods after one another.

    Args:
        qf: ``{method: {module: QueryFactors}}`` stored low-rank query factors.
    """
    names = list(next(iter(qf.values()))) if qf else []
    if len(methods) == 1:  # no copy
        return dict(qf[Method.parse(methods[0]).value])
    return {n: QueryFactors(*(torch.cat([getattr(qf[Method.parse(m).value][n], f) for m in methods])
                              for f in QUERY_FACTOR_FIELDS)) for n in names}


def resolve(refs: Mapping[str, Any]) -> dict:
    """``{name: value}`` from values or Ray object refs (refs are fetched in one call)."""
    keys, vals = list(refs), list(refs.values())
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return dict(refs)
    idx = [i for i, v in enumerate(vals) if isinstance(v, ray.ObjectRef)]
    if idx:
        for i, v in zip(idx, ray.get([vals[i] for i in idx])):
            vals[i] = v
    return dict(zip(keys, vals))
