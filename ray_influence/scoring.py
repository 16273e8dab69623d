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


def scatter_rows(grads: PerModule, names: Sequence[str], order: Sequence[int], rows: Sequence[int],
                 n_docs: int) -> torch.Tensor:
    """``[n_docs, width]`` flat index rows from per-module gradients in collector order.

    Args:
        order: the permutation from collector order to input order.
        rows: the input positions the gradients belong to; the other rows stay 0.
    """
    computed = flatten({n: g[list(order)] for n, g in grads.items()}, names)
    flat = torch.zeros(n_docs, computed.shape[1], dtype=computed.dtype)
    flat[list(rows)] = computed
    return flat


def scatter_scores(result: tuple[torch.Tensor, torch.Tensor], order: Sequence[int], rows: Sequence[int],
                   n_docs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [n_docs, Q], sqnorms [n_docs])`` in input order from an exact pass's collector result.

    Args:
        result: ``(scores [N, Q], sqnorms [N])`` in collector order
            (:class:`~ray_influence.collectors.QueryScoreCollector`).
        order: the permutation from collector order to input order.
        rows: the input positions they belong to; the other rows stay 0.
    """
    s, sq = result
    out_s = torch.zeros(n_docs, s.shape[1], dtype=torch.float64)
    out_sq = torch.zeros(n_docs, dtype=torch.float64)
    out_s[list(rows)] = s[list(order)]
    out_sq[list(rows)] = sq[list(order)]
    return out_s, out_sq


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


def score_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype scores are computed in for documents stored as ``stored``.

    float64 pieces (exact mode, the tests' ground truth) are scored in float64; float32,
    bfloat16 and float16 pieces in float32, which holds more precision than any of them
    stores (each score is one dot product; a float32 sum over ``D`` terms has a relative
    error around ``1e-7 * sqrt(D)``, far below the noise of a k-dimensional projection).
    """
    return torch.float64 if stored == torch.float64 else torch.float32


def rows_scan(flats: Mapping[str, torch.Tensor], keep: torch.Tensor, file_rows: torch.Tensor, dtype: torch.dtype):
    """Feeds rows held in memory to scoring as an index piece would: ``scan(stage, add)``.

    The kept rows of ``flats[stage]`` are rounded to ``dtype`` (what an index piece stores)
    and given to ``add`` in one block; returns ``(their squared norms [N] float64, file_rows)``,
    the norms taken before rounding, as :func:`ray_influence.store.write_index_piece` does.
    """
    def scan(stage: str, add) -> tuple[torch.Tensor, torch.Tensor]:
        flat = flats[stage][keep]
        add(flat.to(dtype))
        return flat.to(torch.float64).square().sum(1), file_rows
    return scan


class BlockScores:
    """Scores of flat query vectors against document rows that arrive block by block.

    Args:
        vectors: ``{method: u [Q, D]}`` flat query vectors (any float dtype).

    Feed ``add(block)`` with consecutive ``[n_i, D]`` blocks of the documents; ``result()``
    is ``{method: [Q, sum_i n_i]}`` float64, in block order.
    """

    def __init__(self, vectors: Mapping[str, torch.Tensor]):
        self._vectors = dict(vectors)
        self._cast: dict = {}
        self._parts: dict[str, list[torch.Tensor]] = {m: [] for m in self._vectors}

    def _u(self, method: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (method, dtype, device)
        if key not in self._cast:  # converted once per piece, not once per block
            self._cast[key] = self._vectors[method].to(device=device, dtype=dtype)
        return self._cast[key]

    def add(self, block: torch.Tensor) -> None:
        work = score_dtype(block.dtype)
        docs = block.to(work)  # [n, D]; a no-op for float32 and float64 pieces
        for m, parts in self._parts.items():
            u = self._u(m, work, docs.device)
            if u.shape[1] != docs.shape[1]:
                raise ValueError(f"query width {u.shape[1]} does not match document width {docs.shape[1]}")
            parts.append(u @ docs.T)  # [Q, n]

    def result(self) -> dict[str, torch.Tensor]:
        return {m: (torch.cat(p, dim=1) if p else torch.zeros(self._vectors[m].shape[0], 0)).to(torch.float64)
                for m, p in self._parts.items()}


def _sorted_top_k(values: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference top-k: two full stable sorts (by position, then by score descending)."""
    by_pos = torch.argsort(positions, dim=1, stable=True)
    values, positions = torch.gather(values, 1, by_pos), torch.gather(positions, 1, by_pos)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, : min(k, values.shape[1])]
    return torch.gather(values, 1, order), torch.gather(positions, 1, order)


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
    kk = min(k, values.shape[1])
    # Equal scores stay in corpus order, so the result does not depend on partitioning or on
    # the order partials arrive in. torch.topk picks the k largest; where exactly k values
    # reach the k-th largest, that set is the answer and only its k members need the stable
    # ordering. Rows with a tie across the cut (or NaN) take the two full stable sorts.
    cand = torch.topk(values, kk, dim=1, sorted=False).indices  # [Q, kk]
    cand_values, cand_positions = torch.gather(values, 1, cand), torch.gather(positions, 1, cand)
    cut = cand_values.min(dim=1, keepdim=True).values  # [Q, 1]
    out_values, out_positions = _sorted_top_k(cand_values, cand_positions, kk)
    ambiguous = (values >= cut).sum(dim=1) != kk  # [Q]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero(as_tuple=True)[0]
        v, p = _sorted_top_k(values[rows], positions[rows], kk)
        out_values, out_positions = out_values.clone(), out_positions.clone()
        out_values[rows], out_positions[rows] = v, p
    return out_values, out_positions
