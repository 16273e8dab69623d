"""Random projections of per-document gradients (the corpus index), DESIGN.md §2.

Per module, ``P_in: [k, d_in']`` and ``P_out: [k, d_out]`` with i.i.d. ``N(0, 1/k)``
entries, regenerated bit-identically from ``(seed, module name)`` on any worker. Then

    Ĝ = P_out DW P_in^T = sum_t (P_out g_t)(P_in a_t)^T      [k, k]
    û = P_out u P_in^T                                          [k, k]

and ``E[<û, Ĝ>] = <u, DW>`` because ``E[P^T P] = I`` and the two sides are independent.
Documents are projected from the projected ``a`` and ``g``; ``DW`` is never formed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .modules import ModuleSpec


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, the same on every machine and Python process."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class Projection:
    """The two projection matrices of one module.

    Attributes:
        p_in: ``[k, d_in']``.
        p_out: ``[k, d_out]``.
    """

    p_in: torch.Tensor
    p_out: torch.Tensor

    @property
    def dim(self) -> int:
        return self.p_in.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Projection":
        return Projection(self.p_in.to(device=device, dtype=dtype), self.p_out.to(device=device, dtype=dtype))


def _gaussian(seed: int, rows: int, cols: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Generated on the CPU in float64, so every device and dtype sees the same matrix.
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / rows**0.5


def make_projection(spec: ModuleSpec, dim: int, seed: int) -> Projection:
    """``P_in``, ``P_out`` for one module, deterministic in ``(seed, spec.name)``.

    Raises:
        ValueError: if ``dim`` is not positive.
    """
    if dim <= 0:
        raise ValueError(f"projection dim must be positive here, got {dim!r} (dim 0 means no projection)")
    return Projection(
        p_in=_gaussian(stable_seed("projection", seed, spec.name, "in"), dim, spec.d_in_aug),
        p_out=_gaussian(stable_seed("projection", seed, spec.name, "out"), dim, spec.d_out),
    )


def project_activations(a: torch.Tensor, proj: Projection) -> torch.Tensor:
    """``P_in a_t``: ``[B, T, d_in'] -> [B, T, k]``."""
    return a @ proj.p_in.T.to(device=a.device, dtype=a.dtype)


def project_gradients(g: torch.Tensor, proj: Projection) -> torch.Tensor:
    """``P_out g_t``: ``[B, T, d_out] -> [B, T, k]``."""
    return g @ proj.p_out.T.to(device=g.device, dtype=g.dtype)


def projected_doc_gradients(pa: torch.Tensor, pg: torch.Tensor) -> torch.Tensor:
    """``Ĝ_b = sum_t (P_out g_t)(P_in a_t)^T``: ``[B, T, k], [B, T, k] -> [B, k, k]``."""
    return torch.einsum("bto,bti->boi", pg, pa)


def project_matrix(u: torch.Tensor, proj: Projection) -> torch.Tensor:
    """``û = P_out u P_in^T``: ``[Q, d_out, d_in'] -> [Q, k, k]``."""
    p_in = proj.p_in.to(device=u.device, dtype=u.dtype)
    p_out = proj.p_out.to(device=u.device, dtype=u.dtype)
    return p_out @ u @ p_in.T
