"""Collectors: what each pass keeps of the captured ``a`` and ``g`` (layout in ekfac.py).

- :class:`CovarianceCollector`: partial sums of A and G (covariance pass);
- :class:`LambdaCollector`: partial sums of Λ in a fixed eigenbasis (Λ pass);
- :class:`GradientCollector`: exact per-document gradients ``DW`` (queries, exact index);
- :class:`ProjectedCollector`: projected per-document gradients ``Ĝ`` (the index);
- :class:`QueryScoreCollector`: exact per-document scores against low-rank queries (the default).

Each is fed batch after batch through :func:`ray_influence.passes.run_pass` and read
out once at the end. They hold plain tensors and know nothing of Ray.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from . import ekfac, lowrank
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


DENSE_QUERY_BYTES = 1 << 30
"""Default bytes of dense query vectors one exact pass may hold for the formed-``DW`` side."""


class QueryScoreCollector:
    """Exact per-document scores against low-rank query factors, and ``‖DW‖_F²`` (the exact pass).

    No gradient is kept: each batch's ``a`` and ``g`` are contracted with every query's
    factors at once (:mod:`ray_influence.lowrank`), per module by the cheaper of the
    low-rank contraction and forming ``DW`` (:func:`~ray_influence.lowrank.forms_gradient`),
    and summed over modules into one ``[B, Q]`` block per batch.

    Args:
        factors: ``{name: QueryFactors}`` of the pass's ``Q`` query vectors (every method
            scored against this model, concatenated), each module's rank the same for all.
        dense_max_bytes: the bytes of dense ``u_r`` (``[Q, d_out, d_in']`` in the work dtype)
            the formed-gradient side may hold, over all modules together; a module whose
            dense ``u_r`` would not fit what is left runs the low-rank side.
        force: ``"low_rank"`` or ``"dense"`` to pin every module's side (tests); None: cost model.
    """

    samples = 1

    def __init__(self, factors: dict, dense_max_bytes: int = DENSE_QUERY_BYTES, force: str | None = None):
        self._factors = factors
        self._dense_left = dense_max_bytes
        self._force = force
        self._converted: dict = {}
        self._calls: dict[str, int] = defaultdict(int)
        self._scores: list[torch.Tensor] = []  # per batch [B, Q] float64, summed over modules
        self._sqnorms: list[torch.Tensor] = []  # per batch [B] float64
        self.sides: dict[str, set] = defaultdict(set)  # which side each module took (for tests)

    def _prepared(self, name: str, side: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, side, dtype, device)
        if key not in self._converted:  # converted once per pass, not once per batch
            f = self._factors[name]
            if side == "dense":
                t = lowrank.dense(f).flatten(1)  # [Q, o i]
            elif side == "left":
                t = f.left.permute(1, 0, 2)  # [o, Q, r]
            else:
                t = f.right.permute(1, 0, 2)  # [i, Q, r]
            self._converted[key] = t.to(device=device, dtype=dtype).contiguous()
        return self._converted[key]

    def keep_input(self, name: str, a: torch.Tensor) -> torch.Tensor:
        return a

    def _forms(self, name: str, n_tokens: int, d_in: int, d_out: int, dtype: torch.dtype, device) -> bool:
        if self._force is not None:
            return self._force == "dense"
        f = self._factors[name]
        n_q = f.left.shape[0]
        if not lowrank.forms_gradient(n_tokens, d_in, d_out, n_q, f.rank):
            return False
        if (name, "dense", dtype, device) in self._converted:
            return True
        size = n_q * d_out * d_in * torch.empty(0, dtype=dtype).element_size()
        if size > self._dense_left:
            return False
        self._dense_left -= size
        return True

    def on_grad(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        work = torch.promote_types(g.dtype, torch.float32)  # bf16 models score in float32
        a, g = a.to(work), g.to(work)
        (B, T, d_in), d_out = a.shape, g.shape[-1]
        if self._forms(name, T, d_in, d_out, work, a.device):
            self.sides[name].add("dense")
            dw = ekfac.per_doc_gradients(a, g)  # [B, o, i]
            s = lowrank.dense_scores(dw, self._prepared(name, "dense", work, a.device))
            sq = dw.square().sum(dim=(1, 2))
        else:
            self.sides[name].add("low_rank")
            s = lowrank.lowrank_scores(a, g, self._prepared(name, "left", work, a.device),
                                       self._prepared(name, "right", work, a.device))
            sq = (lowrank.gram_sqnorms(a, g) if lowrank.gram_is_cheaper(T, d_in, d_out)
                  else ekfac.per_doc_gradients(a, g).square().sum(dim=(1, 2)))
        j = self._calls[name]  # the j-th backward this module sees is the pass's j-th batch
        self._calls[name] += 1
        s, sq = s.detach().to("cpu", torch.float64), sq.detach().to("cpu", torch.float64)
        if j == len(self._scores):
            self._scores.append(s)
            self._sqnorms.append(sq)
        else:
            self._scores[j] += s
            self._sqnorms[j] += sq

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [N, Q], ‖DW‖² [N])`` float64 over every batch, in the order seen, summed over modules."""
        n_q = next(iter(self._factors.values())).left.shape[0] if self._factors else 0
        if not self._scores:
            return torch.zeros(0, n_q, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return torch.cat(self._scores), torch.cat(self._sqnorms)
