"""EK-FAC curvature as pure functions on tensors (DESIGN.md §2).

Tensor layout, used throughout the package and converted into in one place
(:func:`ray_influence.capture.to_layout`):

    a       activations        [B, T, d_in']   module input, bias column of ones appended
                                               when the module has a bias; zero at padding
    g       output-gradients   [B, T, d_out]   dL/d(module output); zero at padding
    DW      per-doc gradients  [N, d_out, d_in']  DW_n = sum_t g_t a_t^T
    V       any matrix in weight space [..., d_out, d_in']

Index conventions in the einsums: ``b`` documents of a batch, ``t`` positions,
``i``/``j`` input features (d_in'), ``o``/``p`` output features (d_out).

Symbols (DESIGN.md) and code names:

    A = (1/N_tokens) sum_t a_t a_t^T        CovarianceStats.a_sum / n_tokens
    G = (1/N_tokens) sum_t g_t g_t^T        CovarianceStats.g_sum / n_tokens
    A = Q_A diag(s_A) Q_A^T                 Eigenbasis.q_a, .s_a
    G = Q_G diag(s_G) Q_G^T                 Eigenbasis.q_g, .s_g
    Λ = (1/N_docs) sum_n (Q_G^T DW_n Q_A)^2  LambdaStats.lam_sum / n_docs
    (H + λ)^-1 V = Q_G [(Q_G^T V Q_A) / (Λ + λ)] Q_A^T     ihvp()

With a row-major ``vec``, ``vec(Q_G^T V Q_A) = (Q_G ⊗ Q_A)^T vec(V)``, so the dense
EK-FAC matrix is ``(Q_G ⊗ Q_A) diag(vec Λ) (Q_G ⊗ Q_A)^T`` (:func:`dense_ekfac`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

import torch

STATS_DTYPE = torch.float64
"""Partial sums and eigendecompositions are kept in float64 whatever the model dtype."""

AUTO_DAMPING_FACTOR = 0.1
"""``damping: auto`` is this factor times mean(Λ) per module (kronfluence's heuristic);
``auto*C`` scales it by C."""

ROW_ALIGN = 16
"""Rows of work buffers start every ``ROW_ALIGN`` elements (64 bytes in float32): a width
such as ``d_in' = 1025`` otherwise puts every row off the cache-line grid, which makes
the BLAS products on it measurably slower (see :func:`aligned_empty`)."""

OUTER_BLOCK = 256
"""Column block of :func:`outer_sum`: only the blocks on and above the diagonal are multiplied."""

LAMBDA_CHUNK = 1 << 20
"""Elements of ``Q_G^T DW Q_A`` held at once by :func:`lambda_sum` (a few documents, cache-sized)."""


class Fisher(str, enum.Enum):
    """Which labels the covariance and Λ passes back-propagate."""

    TRUE = "true"  # labels sampled from the model's predictive distribution
    EMPIRICAL = "empirical"  # the data's own labels

    @classmethod
    def parse(cls, value: object) -> "Fisher":
        """Accepts ``true``/``True`` (the YAML boolean) or ``empirical``."""
        if isinstance(value, cls):
            return value
        if value is True:
            return cls.TRUE
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown fisher {value!r}; expected one of {tuple(f.value for f in cls)}"
            ) from None


# --------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class CovarianceStats:
    """Partial sums of the Kronecker factors of one module; merge with ``+``.

    Attributes:
        a_sum: ``sum_t a_t a_t^T``, ``[d_in', d_in']`` float64.
        g_sum: ``sum_t g_t g_t^T`` averaged over label samples, ``[d_out, d_out]`` float64.
        n_tokens: number of non-padding tokens summed.
    """

    a_sum: torch.Tensor
    g_sum: torch.Tensor
    n_tokens: int

    def __add__(self, other: "CovarianceStats") -> "CovarianceStats":
        _check_same_shape("a_sum", self.a_sum, other.a_sum)
        _check_same_shape("g_sum", self.g_sum, other.g_sum)
        return CovarianceStats(self.a_sum + other.a_sum, self.g_sum + other.g_sum, self.n_tokens + other.n_tokens)


@dataclass(frozen=True)
class LambdaStats:
    """Partial sums of the eigenvalue correction of one module; merge with ``+``.

    Attributes:
        lam_sum: ``sum_n (Q_G^T DW_n Q_A)^2`` averaged over label samples, ``[d_out, d_in']``.
        n_docs: number of documents summed.
    """

    lam_sum: torch.Tensor
    n_docs: int

    def __add__(self, other: "LambdaStats") -> "LambdaStats":
        _check_same_shape("lam_sum", self.lam_sum, other.lam_sum)
        return LambdaStats(self.lam_sum + other.lam_sum, self.n_docs + other.n_docs)


def _check_same_shape(what: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"cannot merge {what} of shape {tuple(x.shape)} with {tuple(y.shape)}")


def sum_stats(parts: Sequence):
    """Sums a non-empty sequence of CovarianceStats or LambdaStats."""
    if not parts:
        raise ValueError("no partial statistics to merge")
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised ``shape`` tensor whose rows (last axis) start every :data:`ROW_ALIGN` elements.

    A view into a buffer whose last axis is rounded up; leading axes stay mergeable, so
    ``x.reshape(-1, shape[-1])`` is still a view.
    """
    *lead, d = shape
    padded = -(-d // ROW_ALIGN) * ROW_ALIGN
    return torch.empty((*lead, padded), dtype=dtype, device=device)[..., :d]


def outer_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum_{b,t} x_bt x_bt^T`` of one batch: ``[B, T, d] -> [d, d]`` float64 (padding rows are zero).

    The batch's product runs in the input's precision, at least float32 (one batch sums
    a few thousand tokens); the caller accumulates batches in float64. Above
    ``2 * OUTER_BLOCK`` columns only the blocks on and above the diagonal are multiplied
    and the rest is mirrored (about 0.6x the multiplications of ``x^T x``).
    """
    x2 = x.reshape(-1, x.shape[-1])  # [n, d]
    x2 = x2.to(torch.promote_types(x2.dtype, torch.float32))
    d = x2.shape[1]
    if d <= 2 * OUTER_BLOCK:
        return (x2.T @ x2).to(STATS_DTYPE)
    out = torch.empty(d, d, dtype=STATS_DTYPE, device=x2.device)
    for i in range(0, d, OUTER_BLOCK):
        j = min(i + OUTER_BLOCK, d)
        rows = (x2[:, i:j].T @ x2[:, i:]).to(STATS_DTYPE)  # [j-i, d-i]: rows i..j, columns i..d
        out[i:j, i:] = rows
        out[j:, i:j] = rows[:, j - i:].T
    return out


# ------------------------------------------------------------------------- eigenbasis


@dataclass(frozen=True)
class Eigenbasis:
    """Eigendecompositions of the two Kronecker factors of one module (float64).

    Attributes:
        q_a: ``[d_in', d_in']`` eigenvectors of A (columns).
        s_a: ``[d_in']`` eigenvalues of A.
        q_g: ``[d_out, d_out]`` eigenvectors of G.
        s_g: ``[d_out]`` eigenvalues of G.
    """

    q_a: torch.Tensor
    s_a: torch.Tensor
    q_g: torch.Tensor
    s_g: torch.Tensor


def eigenbasis(stats: CovarianceStats) -> Eigenbasis:
    """Normalises the partial sums by the token count and eigendecomposes in float64.

    Raises:
        ValueError: if no token was counted.
    """
    if stats.n_tokens <= 0:
        raise ValueError(f"cannot eigendecompose covariances over n_tokens={stats.n_tokens}")
    a = stats.a_sum.to(STATS_DTYPE) / stats.n_tokens
    g = stats.g_sum.to(STATS_DTYPE) / stats.n_tokens
    # Symmetrise against round-off before eigh.
    s_a, q_a = torch.linalg.eigh(0.5 * (a + a.T))
    s_g, q_g = torch.linalg.eigh(0.5 * (g + g.T))
    return Eigenbasis(q_a=q_a, s_a=s_a, q_g=q_g, s_g=s_g)


def _rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x Q`` for ``x: [..., d]``, ``Q: [d, d]``, into an :func:`aligned_empty` result."""
    q = q.to(device=x.device, dtype=x.dtype)
    x2 = x.reshape(-1, x.shape[-1])  # [n, d]
    out = aligned_empty((x2.shape[0], q.shape[1]), x.dtype, x.device)
    torch.mm(x2, q, out=out)
    return out.unflatten(0, x.shape[:-1])  # [..., d], still a view


def rotate_activations(a: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """``a Q_A``: activations in A's eigenbasis, ``[B, T, d_in'] -> [B, T, d_in']``."""
    return _rotate(a, q_a)


def rotate_gradients(g: torch.Tensor, q_g: torch.Tensor) -> torch.Tensor:
    """``g Q_G``: output-gradients in G's eigenbasis, ``[B, T, d_out] -> [B, T, d_out]``."""
    return _rotate(g, q_g)


def per_doc_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``DW_b = sum_t g_t a_t^T``: ``[B, T, d_in'], [B, T, d_out] -> [B, d_out, d_in']``."""
    return torch.bmm(g.transpose(1, 2), a)  # einsum("bto,bti->boi", g, a)


def rotates_per_token(n_tokens: int, d_in: int, d_out: int, samples: int = 1) -> tuple[bool, bool]:
    """Where the Λ pass turns each side into its eigenbasis: per token, or per document.

    ``Q_G^T DW Q_A`` is the same whether ``a`` and ``g`` are rotated token by token before
    ``DW = sum_t g_t a_t^T`` is formed, or ``DW`` is rotated afterwards. Per row of
    ``n_tokens`` (padded) positions, rotating ``a`` costs ``n_tokens d_in'^2`` once (the
    label samples share it) against ``samples d_out d_in'^2`` on ``DW``; rotating ``g``
    costs ``n_tokens d_out^2`` against ``d_out^2 d_in'``, both per sample. The cheaper side
    wins: short documents rotate per token, documents longer than the module's width
    per document.

    Returns:
        ``(rotate a per token, rotate g per token)``.
    """
    return n_tokens <= samples * d_out, n_tokens <= d_in


def lambda_sum(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor | None = None,
               q_g: torch.Tensor | None = None) -> torch.Tensor:
    """Eigenvalue-correction partial sum of one batch and one label sample.

    Args:
        a: activations ``[B, T, d_in']``: in A's eigenbasis (:func:`rotate_activations`)
            when ``q_a`` is None, else as captured, and ``Q_A`` rotates each ``DW``.
        g: output-gradients ``[B, T, d_out]``: in G's eigenbasis (:func:`rotate_gradients`)
            when ``q_g`` is None, else as captured, and ``Q_G`` rotates each ``DW``.
        q_a: ``[d_in', d_in']`` or None (see :func:`rotates_per_token`).
        q_g: ``[d_out, d_out]`` or None.

    Returns:
        ``sum_b (Q_G^T DW_b Q_A)^2`` as ``[d_out, d_in']`` float64.
    """
    work = torch.promote_types(a.dtype, torch.float32)  # one batch in >= float32; batches add in float64
    a, g = a.to(work), g.to(work)
    q_a = q_a.to(device=a.device, dtype=work) if q_a is not None else None
    q_gt = q_g.to(device=g.device, dtype=work).T if q_g is not None else None
    n_docs, d_out, d_in = a.shape[0], g.shape[-1], a.shape[-1]
    total = torch.zeros(d_out, d_in, dtype=work, device=a.device)
    # A few documents at a time, so each chunk of DW_rot is squared while still in cache.
    step = max(1, LAMBDA_CHUNK // (d_out * d_in))
    for b in range(0, n_docs, step):
        dw_rot = per_doc_gradients(a[b:b + step], g[b:b + step])  # [step, d_out, d_in']
        if q_a is not None:
            dw_rot = dw_rot @ q_a
        if q_gt is not None:
            dw_rot = torch.matmul(q_gt, dw_rot)  # Q_G^T DW, broadcast over the documents
        total += dw_rot.square().sum(dim=0)
    return total.to(STATS_DTYPE)


# ---------------------------------------------------------------------------- factors


@dataclass(frozen=True)
class ModuleFactors:
    """Everything the iHVP of one module needs.

    Attributes:
        q_a: ``[d_in', d_in']`` eigenvectors of A.
        q_g: ``[d_out, d_out]`` eigenvectors of G.
        lam: ``[d_out, d_in']`` corrected eigenvalues Λ.
        damping: the resolved damping λ (a float, never applied in place).
        n_tokens: tokens behind A and G.
        n_docs: documents behind Λ.
    """

    q_a: torch.Tensor
    q_g: torch.Tensor
    lam: torch.Tensor
    damping: float
    n_tokens: int
    n_docs: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_g.shape[0], self.q_a.shape[0])


def auto_scale(damping: str) -> float:
    """The factor ``C`` of a damping spec ``"auto"`` (1) or ``"auto*C"`` (C times the auto value).

    Raises:
        ValueError: for any other string, or a ``C`` that is not a positive finite number.
    """
    head, star, factor = damping.partition("*")
    if head.strip() == "auto" and not star:
        return 1.0
    if head.strip() == "auto":
        try:
            scale = float(factor)
        except ValueError:
            scale = float("nan")
        if math.isfinite(scale) and scale > 0:
            return scale
    raise ValueError(f"unknown damping {damping!r}; expected 'auto', 'auto*C' with a positive number C "
                     "(C x the auto value), or a non-negative float")


def resolve_damping(lam: torch.Tensor, damping: str | float) -> float:
    """The damping λ for one module.

    Args:
        lam: Λ ``[d_out, d_in']``.
        damping: ``"auto"`` (``0.1 * mean(Λ)``), ``"auto*C"`` (``C * 0.1 * mean(Λ)``, e.g.
            ``"auto*10"``) or a non-negative float.

    Raises:
        ValueError: for any other value.
    """
    if isinstance(damping, str):
        value = auto_scale(damping) * AUTO_DAMPING_FACTOR * float(lam.mean())
        # A module whose gradients all vanish would get λ = 0 and an undefined inverse.
        return value if value > 0 else 1e-12
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
        raise ValueError(f"invalid damping {damping!r}; expected 'auto', 'auto*C' or a non-negative float")
    return float(damping)


def module_factors(
    basis: Eigenbasis, cov: CovarianceStats, lam: LambdaStats, damping: str | float
) -> ModuleFactors:
    """Assembles :class:`ModuleFactors` from the eigenbasis and the Λ partial sums."""
    if lam.n_docs <= 0:
        raise ValueError(f"cannot normalise Λ over n_docs={lam.n_docs}")
    lam_mean = lam.lam_sum.to(STATS_DTYPE) / lam.n_docs
    return ModuleFactors(
        q_a=basis.q_a,
        q_g=basis.q_g,
        lam=lam_mean,
        damping=resolve_damping(lam_mean, damping),
        n_tokens=cov.n_tokens,
        n_docs=lam.n_docs,
    )


def ihvp(v: torch.Tensor, factors: ModuleFactors) -> torch.Tensor:
    """Damped inverse EK-FAC times V.

    ``(H + λ I)^-1 V = Q_G [(Q_G^T V Q_A) ⊘ (Λ + λ)] Q_A^T``, computed in float64.

    Args:
        v: ``[..., d_out, d_in']``.
        factors: the module's :class:`ModuleFactors`.

    Returns:
        ``[..., d_out, d_in']`` in float64.

    Raises:
        ValueError: if ``v``'s trailing shape is not the module's.
    """
    if tuple(v.shape[-2:]) != factors.shape:
        raise ValueError(f"ihvp: vector of shape {tuple(v.shape)} does not match module shape {factors.shape}")
    q_a, q_g = factors.q_a.to(v.device), factors.q_g.to(v.device)
    lam = factors.lam.to(v.device)
    v64 = v.to(STATS_DTYPE)
    rotated = q_g.T @ v64 @ q_a  # [..., d_out, d_in']
    rotated = rotated / (lam + factors.damping)
    return q_g @ rotated @ q_a.T


def dense_ekfac(q_a: torch.Tensor, q_g: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The EK-FAC matrix ``(Q_G ⊗ Q_A) diag(vec Λ) (Q_G ⊗ Q_A)^T``, for tests on tiny modules.

    Returns:
        ``[d_out * d_in', d_out * d_in']`` acting on row-major ``vec(V)``.
    """
    q = torch.kron(q_g, q_a)
    return q @ torch.diag(lam.reshape(-1)) @ q.T
