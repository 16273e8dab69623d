"""Scoring methods: the query vector each one builds, and the scores (DESIGN.md §2).

    multi_stage   u = (H_pt+λ_pt)^-1 (H_ft+λ_ft)^-1 ∇L(q, θ_ft)   docs at θ_pt
    single_stage  u = (H_ft+λ_ft)^-1 ∇L(q, θ_ft)                   docs at θ_ft
    grad_dot      u = ∇L(q, θ_ft)                                  docs at θ_pt
    grad_cos      grad_dot, cosine-normalised                      docs at θ_pt

The fine-tuning inverse is applied first, then the pre-training one; the two do not
commute. Score ``I(z, q) = sum_m <u_m, DW_m>`` (or its projected estimate); positive
means a proponent, and results rank by score descending.
"""

from __future__ import annotations

import enum
from typing import Callable, Mapping, Sequence

import torch

from .ekfac import ModuleFactors, ihvp
from .modules import ModuleSpec

PerModule = Mapping[str, torch.Tensor]
Factors = Mapping[str, ModuleFactors]


class Method(str, enum.Enum):
    MULTI_STAGE = "multi_stage"
    SINGLE_STAGE = "single_stage"
    GRAD_DOT = "grad_dot"
    GRAD_COS = "grad_cos"

    @classmethod
    def parse(cls, value: object) -> "Method":
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown method {value!r}; expected one of {tuple(m.value for m in cls)}") from None

    @property
    def doc_model(self) -> str:
        """Which model's document gradients the method scores against."""
        return "finetuned" if self is Method.SINGLE_STAGE else "pretrained"

    @property
    def cosine(self) -> bool:
        return self is Method.GRAD_COS

    @property
    def needs_factors(self) -> tuple[str, ...]:
        return {
            Method.MULTI_STAGE: ("finetuned", "pretrained"),
            Method.SINGLE_STAGE: ("finetuned",),
        }.get(self, ())


def _check_modules(grads: PerModule, factors: Factors, which: str) -> None:
    missing = sorted(set(grads) - set(factors))
    if missing:
        raise ValueError(f"no {which} factors for modules {missing}")


def multi_stage_vectors(grads: PerModule, factors_ft: Factors, factors_pt: Factors) -> dict[str, torch.Tensor]:
    """``u_m = (H_pt+λ_pt)^-1 (H_ft+λ_ft)^-1 g_m`` for every module; ``[Q, d_out, d_in']`` each."""
    _check_modules(grads, factors_ft, "fine-tuned")
    _check_modules(grads, factors_pt, "pre-trained")
    return {n: ihvp(ihvp(g, factors_ft[n]), factors_pt[n]) for n, g in grads.items()}


def single_stage_vectors(grads: PerModule, factors_ft: Factors, factors_pt: Factors | None = None) -> dict[str, torch.Tensor]:
    """``u_m = (H_ft+λ_ft)^-1 g_m``."""
    _check_modules(grads, factors_ft, "fine-tuned")
    return {n: ihvp(g, factors_ft[n]) for n, g in grads.items()}


def raw_vectors(grads: PerModule, factors_ft: Factors | None = None, factors_pt: Factors | None = None) -> dict[str, torch.Tensor]:
    """``u_m = g_m`` (grad_dot and grad_cos; the cosine is taken at scoring)."""
    return {n: g.to(torch.float64) for n, g in grads.items()}


PRECONDITIONERS: dict[Method, Callable[..., dict[str, torch.Tensor]]] = {
    Method.MULTI_STAGE: multi_stage_vectors,
    Method.SINGLE_STAGE: single_stage_vectors,
    Method.GRAD_DOT: raw_vectors,
    Method.GRAD_COS: raw_vectors,
}


def query_vectors(
    method: Method, grads: PerModule, factors_ft: Factors | None, factors_pt: Factors | None
) -> dict[str, torch.Tensor]:
    """The method's query vectors ``u`` from query gradients ``g: {name: [Q, d_out, d_in']}``."""
    return PRECONDITIONERS[Method.parse(method)](grads, factors_ft, factors_pt)


def flatten(per_module: PerModule, names: Sequence[str]) -> torch.Tensor:
    """``{name: [N, r, c]}`` -> ``[N, sum_m r_m c_m]``, modules in ``names`` order."""
    missing = [n for n in names if n not in per_module]
    if missing:
        raise ValueError(f"missing modules {missing}")
    return torch.cat([per_module[n].flatten(start_dim=1) for n in names], dim=1)


def index_width(specs: Mapping[str, ModuleSpec], dim: int) -> int:
    """Columns of a flat index row: ``sum_m k^2``, or ``sum_m d_out d_in'`` when exact."""
    return sum(dim * dim if dim else s.d_out * s.d_in_aug for s in specs.values())


def finite_rows(flat: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``[N]`` bool: True at ``rows`` of ``flat`` ``[N, D]`` that are finite everywhere."""
    finite = torch.zeros(flat.shape[0], dtype=torch.bool)
    finite[list(rows)] = torch.isfinite(flat[list(rows)]).all(dim=1)
    return finite


def scores(u: torch.Tensor, docs: torch.Tensor, cosine: bool = False, doc_sqnorm: torch.Tensor | None = None) -> torch.Tensor:
    """Influence scores ``[Q, N]`` from flat query vectors ``u: [Q, D]`` and documents ``[N, D]``.

    Args:
        cosine: divide by both norms (grad_cos).
        doc_sqnorm: ``[N]`` squared document norms; computed from ``docs`` when None.
    """
    if u.shape[1] != docs.shape[1]:
        raise ValueError(f"query width {u.shape[1]} does not match document width {docs.shape[1]}")
    u64, d64 = u.to(torch.float64), docs.to(torch.float64)
    out = u64 @ d64.T
    if cosine:
        dn = (d64.square().sum(1) if doc_sqnorm is None else doc_sqnorm.to(torch.float64)).sqrt()
        qn = u64.square().sum(1).sqrt()
        out = out / (qn[:, None] * dn[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    return out


def top_k(values: torch.Tensor, k: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` per row of ``values: [Q, M]``, descending; ties go to the lower position.

    Args:
        k: how many to keep (positive).
        positions: ``[Q, M]``, or ``[M]`` shared by every row: global corpus positions of
            the columns; the column indices when None.

    Returns:
        ``(values [Q, k'], positions [Q, k'])`` with ``k' = min(k, M)``.

    Raises:
        ValueError: if ``k`` is not positive.
    """
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k!r}")
    if positions is None:
        positions = torch.arange(values.shape[1])
    if positions.dim() == 1:
        positions = positions.expand(values.shape[0], -1)
    if values.shape[1] == 0:
        return values, positions
    # Sort by position, then stable-sort by score: equal scores stay in corpus order, so the
    # result does not depend on partitioning or on the order partials arrive in.
    by_pos = torch.argsort(positions, dim=1, stable=True)
    values, positions = torch.gather(values, 1, by_pos), torch.gather(positions, 1, by_pos)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, : min(k, values.shape[1])]
    return torch.gather(values, 1, order), torch.gather(positions, 1, order)
