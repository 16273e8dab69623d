"""Collectors: what each pass keeps of the captured ``a`` and ``g`` (layout in ekfac.py).

- :class:`CovarianceCollector`: partial sums of A and G (covariance pass);
- :class:`LambdaCollector`: partial sums of Λ in a fixed eigenbasis (Λ pass);
- :class:`GradientCollector`: exact per-document gradients ``DW`` (queries, exact index);
- :class:`ProjectedCollector`: projected per-document gradients ``Ĝ`` (the index).

Each is fed batch after batch through :func:`ray_influence.passes.run_pass` and read
out once at the end. They hold plain tensors and know nothing of Ray.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from . import ekfac
from .modules import ModuleSpec
from .projection import Projection, project_activations, project_gradients, projected_doc_gradients


class CovarianceCollector:
    """Accumulates ``sum a a^T``, ``mean_s sum g g^T`` and token counts per module."""

    def __init__(self, specs: dict[str, ModuleSpec], samples: int = 1):
        self.samples = samples
        self._a = {n: torch.zeros(s.d_in_aug, s.d_in_aug, dtype=ekfac.STATS_DTYPE) for n, s in specs.items()}
        self._g = {n: torch.zeros(s.d_out, s.d_out, dtype=ekfac.STATS_DTYPE) for n, s in specs.items()}
        self._tokens = 0

    def add_tokens(self, n_tokens: int) -> None:
        self._tokens += n_tokens

    def keep_input(self, name: str, a: torch.Tensor) -> list:
        # A is added on the first backward, not in the forward, so a batch whose forward
        # turns out non-finite (and gets no backward) leaves no trace.
        return [a]

    def on_grad(self, name: str, kept: list, g: torch.Tensor) -> None:
        if kept[0] is not None:
            self._a[name] += ekfac.outer_sum(kept[0]).cpu()
            kept[0] = None
        self._g[name] += ekfac.outer_sum(g).cpu() / self.samples

    def result(self) -> dict[str, ekfac.CovarianceStats]:
        return {n: ekfac.CovarianceStats(self._a[n], self._g[n], self._tokens) for n in self._a}


class LambdaCollector:
    """Accumulates ``mean_s sum_n (Q_G^T DW_n Q_A)^2`` and document counts per module."""

    def __init__(self, bases: dict[str, ekfac.Eigenbasis], samples: int = 1):
        self.samples = samples
        self._bases = bases
        self._lam = {
            n: torch.zeros(b.q_g.shape[0], b.q_a.shape[0], dtype=ekfac.STATS_DTYPE) for n, b in bases.items()
        }
        self._docs = 0
        self._converted: dict = {}

    def add_docs(self, n_docs: int) -> None:
        self._docs += n_docs

    def _basis(self, name: str, which: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``Q_A`` or ``Q_G`` in ``dtype`` on ``device``, converted once per pass."""
        key = (name, which, device, dtype)
        if key not in self._converted:
            q = getattr(self._bases[name], which)
            self._converted[key] = ekfac.aligned_empty(q.shape, dtype, device).copy_(q)
        return self._converted[key]

    def keep_input(self, name: str, a: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(a in A's eigenbasis, True)``, or ``(a, False)`` when ``DW`` is rotated instead."""
        d_out = self._bases[name].q_g.shape[0]
        if ekfac.rotates_per_token(a.shape[1], a.shape[-1], d_out, self.samples)[0]:
            return ekfac.rotate_activations(a, self._basis(name, "q_a", a.dtype, a.device)), True
        return a, False

    def on_grad(self, name: str, kept: tuple[torch.Tensor, bool], g: torch.Tensor) -> None:
        a, a_rotated = kept
        work = torch.promote_types(g.dtype, torch.float32)  # DW is rotated in lambda_sum's precision
        q_g = None
        if ekfac.rotates_per_token(g.shape[1], a.shape[-1], g.shape[-1], self.samples)[1]:
            g = ekfac.rotate_gradients(g, self._basis(name, "q_g", g.dtype, g.device))
        else:
            q_g = self._basis(name, "q_g", work, g.device)
        q_a = None if a_rotated else self._basis(name, "q_a", work, a.device)
        self._lam[name] += ekfac.lambda_sum(a, g, q_a, q_g).cpu() / self.samples

    def result(self) -> dict[str, ekfac.LambdaStats]:
        return {n: ekfac.LambdaStats(lam, self._docs) for n, lam in self._lam.items()}


class _PerDocCollector:
    """Shared part of the two per-document collectors: one tensor per batch per module."""

    samples = 1

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        self._parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._shapes = shapes

    def _store(self, name: str, per_doc: torch.Tensor) -> None:
        self._parts[name].append(per_doc.detach().cpu())

    def result(self) -> dict[str, torch.Tensor]:
        """``{name: [N, rows, cols]}`` over every batch seen, in order (N may be 0)."""
        return {n: torch.cat(self._parts[n]) if self._parts[n] else torch.zeros(0, *shape)
                for n, shape in self._shapes.items()}


class GradientCollector(_PerDocCollector):
    """Exact per-document gradients ``DW: [N, d_out, d_in']`` per module."""

    def __init__(self, specs: dict[str, ModuleSpec]):
        super().__init__({n: s.shape for n, s in specs.items()})

    def keep_input(self, name: str, a: torch.Tensor) -> torch.Tensor:
        return a

    def on_grad(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        self._store(name, ekfac.per_doc_gradients(a, g))


class ProjectedCollector(_PerDocCollector):
    """Projected per-document gradients ``Ĝ: [N, k, k]`` per module, from ``P a`` and ``P g``."""

    def __init__(self, projections: dict[str, Projection]):
        super().__init__({n: (p.dim, p.dim) for n, p in projections.items()})
        self._proj = projections

    def keep_input(self, name: str, a: torch.Tensor) -> torch.Tensor:
        return project_activations(a, self._proj[name])

    def on_grad(self, name: str, pa: torch.Tensor, g: torch.Tensor) -> None:
        pg = project_gradients(g, self._proj[name])
        self._store(name, projected_doc_gradients(pa, pg))
