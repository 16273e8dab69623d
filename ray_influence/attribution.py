"""The library in one process: fit factors, take document and query gradients, score.

These functions are what the Ray workers call on their own partitions; run together
they are the single-process reference the distributed job is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import ekfac
from .collectors import CovarianceCollector, GradientCollector, LambdaCollector, ProjectedCollector
from .ekfac import Fisher, ModuleFactors
from .modules import ModuleSpec
from .passes import Labels, run_pass, run_with_rerun
from .projection import Projection, project_matrix
from .scoring import Method, flatten, query_vectors, scores
from .tokens import Example, batches, collate

DEFAULT_MAX_TOKENS = 4096
FISHER_LABEL_STREAM = "fisher"
"""The covariance and Λ passes draw the *same* labels per document. Λ is then the exact
diagonal, in the eigenbasis, of the Fisher estimate that basis came from; in particular it
vanishes on G's and A's null spaces, whose eigenvectors are arbitrary up to round-off, so
the factors do not depend on how the sums were split across workers. (Fresh labels in the
Λ pass would put mass on those arbitrary directions.)"""


def run_batches(
    model: nn.Module,
    examples: Sequence[Example],
    specs: dict[str, ModuleSpec],
    collector,
    labels: Labels,
    seed: int,
    max_tokens: int,
    on_batch=None,
) -> tuple[list[str], torch.Tensor, list[str]]:
    """Feeds ``examples`` batch by batch through :func:`run_pass` into ``collector``.

    Examples are grouped by length first (stable sort), so a batch carries little padding;
    the collector then sees them in that order, which the returned keys follow. A batch
    holding a row whose forward is not finite gets no backward; it is rerun without those
    rows, which are returned as skipped.

    Args:
        on_batch: called with each batch that reached the collector (for token counts).

    Returns:
        ``(kept keys in order, their data losses [N], skipped keys)``.
    """
    def run(groups: Sequence[list[Example]]):
        for group in groups:
            batch = collate(group)
            loss = run_pass(model, batch, specs, collector, labels, seed, FISHER_LABEL_STREAM)
            if on_batch is not None and bool(torch.isfinite(loss).all()):
                on_batch(batch)
            yield group, loss

    return run_with_rerun(batches(sorted(examples, key=len), max_tokens), run, window=1)


def _labels(fisher: Fisher) -> Labels:
    return Labels.SAMPLED if Fisher.parse(fisher) is Fisher.TRUE else Labels.DATA


@dataclass
class PassPlan:
    """What one pass feeds its batches into: a collector, the labels, a per-batch callback."""

    collector: Any
    labels: Labels = Labels.DATA
    on_batch: Callable | None = None


def covariance_plan(specs: dict[str, ModuleSpec], fisher: Fisher = Fisher.TRUE, samples: int = 1) -> PassPlan:
    labels = _labels(fisher)
    col = CovarianceCollector(specs, samples if labels is Labels.SAMPLED else 1)
    return PassPlan(col, labels, lambda b: col.add_tokens(b.n_tokens))


def lambda_plan(bases: Mapping[str, ekfac.Eigenbasis], fisher: Fisher = Fisher.TRUE, samples: int = 1) -> PassPlan:
    labels = _labels(fisher)
    col = LambdaCollector(dict(bases), samples if labels is Labels.SAMPLED else 1)
    return PassPlan(col, labels, lambda b: col.add_docs(len(b.keys)))


def gradient_plan(specs: dict[str, ModuleSpec], projections: Mapping[str, Projection] | None = None) -> PassPlan:
    return PassPlan(GradientCollector(specs) if projections is None else ProjectedCollector(dict(projections)))


def covariance_pass(
    model: nn.Module,
    examples: Sequence[Example],
    specs: dict[str, ModuleSpec],
    fisher: Fisher = Fisher.TRUE,
    samples: int = 1,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> dict[str, ekfac.CovarianceStats]:
    """Partial sums of A and G over ``examples`` (one worker's share)."""
    plan = covariance_plan(specs, fisher, samples)
    run_batches(model, examples, specs, plan.collector, plan.labels, seed, max_tokens, plan.on_batch)
    return plan.collector.result()


def lambda_pass(
    model: nn.Module,
    examples: Sequence[Example],
    specs: dict[str, ModuleSpec],
    bases: Mapping[str, ekfac.Eigenbasis],
    fisher: Fisher = Fisher.TRUE,
    samples: int = 1,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> dict[str, ekfac.LambdaStats]:
    """Partial sums of Λ over ``examples`` in the given eigenbases."""
    plan = lambda_plan(bases, fisher, samples)
    run_batches(model, examples, specs, plan.collector, plan.labels, seed, max_tokens, plan.on_batch)
    return plan.collector.result()


def fit_factors(
    model: nn.Module,
    examples: Sequence[Example],
    specs: dict[str, ModuleSpec],
    fisher: Fisher = Fisher.TRUE,
    samples: int = 1,
    seed: int = 0,
    damping: str | float = "auto",
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> dict[str, ModuleFactors]:
    """EK-FAC factors of every tracked module: covariance pass, eigh, Λ pass."""
    if not examples:
        raise ValueError("cannot fit factors on zero examples")
    cov = covariance_pass(model, examples, specs, fisher, samples, seed, max_tokens)
    bases = {n: ekfac.eigenbasis(c) for n, c in cov.items()}
    lam = lambda_pass(model, examples, specs, bases, fisher, samples, seed, max_tokens)
    return {n: ekfac.module_factors(bases[n], cov[n], lam[n], damping) for n in specs}


@dataclass(frozen=True)
class DocGradients:
    """Per-document gradients of a list of examples.

    Attributes:
        keys: the keys of the examples with a finite forward, in order.
        grads: ``{name: [N, d_out, d_in']}`` exact, or ``[N, k, k]`` projected, for ``keys``.
        losses: ``[N]`` data losses of ``keys``.
        skipped: keys of examples whose forward was not finite (no gradient taken).
    """

    keys: tuple[str, ...]
    grads: dict[str, torch.Tensor]
    losses: torch.Tensor
    skipped: tuple[str, ...] = ()


def document_gradients(
    model: nn.Module,
    examples: Sequence[Example],
    specs: dict[str, ModuleSpec],
    projections: Mapping[str, Projection] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> DocGradients:
    """Per-document gradients with the data's labels: exact, or projected when given."""
    if not examples:
        raise ValueError("no examples to take gradients of")
    col = gradient_plan(specs, projections).collector
    kept, losses, skipped = run_batches(model, examples, specs, col, Labels.DATA, 0, max_tokens)
    order = input_order(examples, kept)
    grads = {n: g[order] for n, g in col.result().items()}
    return DocGradients(tuple(kept[j] for j in order), grads, losses[order], tuple(skipped))


def input_order(examples: Sequence[Example], kept: Sequence[str]) -> list[int]:
    """The permutation taking collector order (batches ran sorted by length) back to input order."""
    rank = {e.key: i for i, e in enumerate(examples)}
    return sorted(range(len(kept)), key=lambda j: rank[kept[j]])


def influence_scores(
    method: Method,
    query_grads: Mapping[str, torch.Tensor],
    doc_grads: Mapping[str, torch.Tensor],
    names: Sequence[str],
    factors_ft: Mapping[str, ModuleFactors] | None,
    factors_pt: Mapping[str, ModuleFactors] | None,
    projections: Mapping[str, Projection] | None = None,
) -> torch.Tensor:
    """``[Q, N]`` scores of a method, from exact query gradients and (projected) doc gradients."""
    u = query_vectors(method, query_grads, factors_ft, factors_pt)
    if projections is not None:
        u = {n: project_matrix(u[n], projections[n]) for n in names}
    return scores(flatten(u, names), flatten(doc_grads, names), cosine=Method.parse(method).cosine)
