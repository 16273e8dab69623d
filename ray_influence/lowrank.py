"""Exact document gradients scored against low-rank preconditioned queries (DESIGN.md §2).

The default scoring path. Per tracked module, the preconditioned query vector
``u: [d_out, d_in']`` (float64, from :func:`ray_influence.scoring.query_vectors`) is cut to
its rank-``r`` truncated SVD, with the singular values folded into the left factor:

    u ≈ u_r = Σ_{k≤r} σ_k p_k q_kᵀ = L Rᵀ,   L = [σ_k p_k]  [d_out, r],   R = [q_k]  [d_in', r]

A document's exact gradient ``DW = Σ_t g_t a_tᵀ`` is never stored. Its score is taken
during the corpus pass, one of two ways per module (:func:`forms_gradient` picks the
cheaper):

    low rank   <u_r, DW> = Σ_t Σ_k (L_kᵀ g_t)(R_kᵀ a_t)          two matmuls, a product summed
    dense      <u_r, DW> = <L Rᵀ, Σ_t g_t a_tᵀ>                   form DW, one dot per query

Both are the same number; the per-token terms ``Σ_k (L_kᵀ g_t)(R_kᵀ a_t)`` are the inner
sums, so token and layer influence add up to the score. ``r = 0`` keeps every singular
direction, which is exact. The retained energy ``Σ_{k≤r} σ_k² / Σ_k σ_k²`` says how much
of ``‖u‖²`` the rank keeps.

This is a projection of each document's gradient onto the query's own singular
directions ``p_k q_kᵀ`` instead of random ones, which is why it keeps the ranking that a
random ``k × k`` projection loses.

Index conventions: ``b`` documents of a batch, ``t`` positions, ``o`` output features
(d_out), ``i`` input features (d_in'), ``q`` query vectors (every (method, query) pair a
pass scores), ``k`` the rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

QUERY_BLOCK_BYTES = 64 << 20
"""Bytes of the ``[B, T, q, k]`` work buffers of :func:`lowrank_scores` held at once: the
queries are scored in blocks of that size, so memory does not grow with their number."""


QUERY_STAGE_BYTES = 1 << 30
"""Bytes of exact query gradients and preconditioned query vectors one worker of the query
stage holds at once (``scoring.query_block: 0``): the queries run in blocks of that size."""


def query_block_size(n_queries: int, n_params: int, n_methods: int, budget: int = QUERY_STAGE_BYTES) -> int:
    """Queries per block of the query stage, so that one block's float64 arrays fit ``budget``.

    A block of ``B`` queries holds its gradients ``[B, P]`` and, per method, the
    preconditioned vectors ``[B, P]`` plus one intermediate of the same size while they are
    formed: ``B · P · 8 · (n_methods + 2)`` bytes for the ``P = n_params`` tracked weights of
    one worker. At least 1, at most ``n_queries``.
    """
    per_query = max(1, n_params) * 8 * (n_methods + 2)
    return max(1, min(n_queries, budget // per_query))


@dataclass(frozen=True)
class QueryFactors:
    """One module's rank-``r`` query factors for ``Q`` query vectors (float64).

    Attributes:
        left: ``[Q, d_out, r]``, ``σ_k p_k`` in column ``k``.
        right: ``[Q, d_in', r]``, ``q_k`` in column ``k``.
        sqnorm: ``[Q]`` ``‖u‖_F² = Σ_k σ_k²`` of the untruncated query vector.
        kept: ``[Q]`` ``Σ_{k≤r} σ_k²``, the part of ``sqnorm`` the rank keeps.
    """

    left: torch.Tensor
    right: torch.Tensor
    sqnorm: torch.Tensor
    kept: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[-1]


def effective_rank(rank: int, d_out: int, d_in: int) -> int:
    """The rank kept for a ``[d_out, d_in]`` module: ``rank`` clipped to ``min(d_out, d_in)``; 0 = all."""
    full = min(d_out, d_in)
    return full if rank <= 0 else min(rank, full)


def truncate(u: torch.Tensor, rank: int) -> QueryFactors:
    """The rank-``rank`` truncated SVD of each query vector, ``u: [Q, d_out, d_in']``.

    ``rank`` 0, or one at least ``min(d_out, d_in')``, keeps every singular direction.
    The SVD runs in float64 whatever ``u``'s dtype.
    """
    u = u.to(torch.float64)
    r = effective_rank(rank, u.shape[-2], u.shape[-1])
    p, s, qh = torch.linalg.svd(u, full_matrices=False)  # [Q, o, m], [Q, m], [Q, m, i]
    s2 = s.square()
    return QueryFactors(
        left=(p[..., :r] * s[:, None, :r]).contiguous(),
        right=qh[:, :r, :].transpose(1, 2).contiguous(),
        sqnorm=s2.sum(1),
        kept=s2[:, :r].sum(1),
    )


def dense(f: QueryFactors) -> torch.Tensor:
    """``u_r = L Rᵀ``: ``[Q, d_out, d_in']`` float64."""
    return torch.bmm(f.left, f.right.transpose(1, 2))


def concat(parts: list[QueryFactors]) -> QueryFactors:
    """The factors of consecutive query blocks as one (the rank is the same in every block)."""
    return QueryFactors(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(QueryFactors)))


def forms_gradient(n_tokens: int, d_in: int, d_out: int, n_queries: int, rank: int) -> bool:
    """Whether forming ``DW`` costs fewer flops per document than the low-rank contraction.

    Per document of ``n_tokens`` (padded) positions: the low-rank side costs
    ``n_tokens · n_queries · rank · (d_in' + d_out)`` multiply-adds (two matmuls; the
    product summed over tokens is smaller); forming ``DW`` costs ``n_tokens · d_out · d_in'``
    and its dot with every dense ``u_r`` another ``n_queries · d_out · d_in'``.
    """
    low_rank = n_tokens * n_queries * rank * (d_in + d_out)
    formed = d_out * d_in * (n_tokens + n_queries)
    return formed < low_rank


def gram_is_cheaper(n_tokens: int, d_in: int, d_out: int) -> bool:
    """Whether ``‖DW‖_F²`` is cheaper from the token Gram matrices than from ``DW`` itself.

    ``‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (g_tᵀ g_s)(a_tᵀ a_s)`` costs ``n_tokens² (d_in' + d_out)``
    against ``n_tokens d_out d_in'`` for forming ``DW``.
    """
    return n_tokens * (d_in + d_out) < d_out * d_in


def _blocks(n_queries: int, rank: int, n_rows: int, itemsize: int) -> int:
    """Queries per block so that one ``[n_rows, block, rank]`` buffer fits :data:`QUERY_BLOCK_BYTES`."""
    per_query = max(1, n_rows * rank * itemsize)
    return max(1, min(n_queries, QUERY_BLOCK_BYTES // per_query))


def lowrank_scores(a: torch.Tensor, g: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``<u_r, DW_b>`` for every document of a batch and every query: ``[B, Q]``.

    Args:
        a: ``[B, T, d_in']`` activations (zero at padding).
        g: ``[B, T, d_out]`` output-gradients (zero at padding).
        left: ``[d_out, Q, r]`` the queries' left factors, in ``a``'s dtype and device.
        right: ``[d_in', Q, r]`` their right factors.

    Returns:
        ``[B, Q]`` in ``a``'s dtype.
    """
    B, T, d_in = a.shape
    d_out, n_q, r = left.shape
    a2, g2 = a.reshape(B * T, d_in), g.reshape(B * T, d_out)
    out = []
    step = _blocks(n_q, r, B * T, a.element_size())
    for s in range(0, n_q, step):
        lq = left[:, s:s + step].reshape(d_out, -1)  # [o, q k]
        rq = right[:, s:s + step].reshape(d_in, -1)  # [i, q k]
        gl = (g2 @ lq).view(B, T, -1, r)  # [b, t, q, k]  L_kᵀ g_t
        ar = (a2 @ rq).view(B, T, -1, r)  # [b, t, q, k]  R_kᵀ a_t
        out.append(gl.mul_(ar).sum(dim=(1, 3)))  # [b, q]
    return torch.cat(out, dim=1)


def dense_scores(dw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``<u_q, DW_b>``: ``dw: [B, d_out, d_in']``, ``u: [Q, d_out · d_in']`` -> ``[B, Q]``."""
    return dw.reshape(dw.shape[0], -1) @ u.T


def gram_sqnorms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``‖DW_b‖_F² = Σ_{t,s} (g_tᵀ g_s)(a_tᵀ a_s)``: ``[B]`` in ``a``'s dtype."""
    return (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2))


def lowrank_token_terms(a: torch.Tensor, g: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Per-position terms ``Σ_k (L_kᵀ g_t)(R_kᵀ a_t)`` of one document: ``[Q, T]``.

    Args:
        a: ``[1, T, d_in']``; g: ``[1, T, d_out]``.
        left: ``[Q, d_out, r]``; right: ``[Q, d_in', r]`` (same dtype as ``a``).
    """
    gl = torch.einsum("bto,qok->qtk", g, left)
    ar = torch.einsum("bti,qik->qtk", a, right)
    return (gl * ar).sum(2)
