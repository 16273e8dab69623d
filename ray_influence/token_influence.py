"""Per-token and per-module influence of the top documents (DESIGN.md §2, split up).

A document's score is a sum over tracked modules ``m`` and positions ``t``:

    exact      I(z, q) = Σ_m <u_m, DW_m> = Σ_m Σ_t g_{m,t}ᵀ u_m a_{m,t}
    projected  Î(z, q) = Σ_m <û_m, Ĝ_m>  = Σ_m Σ_t (P_out g_{m,t})ᵀ û_m (P_in a_{m,t})

so position ``t`` (the document's token ``x_t``) gets the term ``Σ_m g_tᵀ u_m a_t`` and
module ``m`` the term ``Σ_t g_tᵀ u_m a_t``; each set sums to the document's score. ``u``
(or ``û``) is the query vector the query stage stored (``queries/vectors.shard-0``), so
the terms add up to the score in the results, up to the index's storage dtype. For
``grad_cos`` every term is divided by ``|û| |Ĝ|`` (the document's norm from its index
piece), like the score.

Index conventions of the einsums: ``b`` the document (one per pass), ``t`` position, ``o``
output rows, ``i`` input columns, ``r`` the (method, query) pairs explained on the document.
Layout: ``a: [1, T, d_in']`` (projected ``[1, T, k]``), ``g: [1, T, d_out]`` (``[1, T, k]``),
``u: [R, d_out, d_in']`` (``[R, k, k]``).

The terms are computed where the models already are: :func:`replica_token_terms` runs on
a replica's head, inside its worker actor (:meth:`~ray_influence.worker.ReplicaActor.token_terms`),
and uses its loaded models, tokenizer and file cache.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa
import torch
from torch import nn

from .data import Partition
from .lowrank import lowrank_token_terms
from .modules import ModuleSpec
from .passes import Labels, run_pass
from .projection import Projection, project_activations, project_gradients
from .scoring import Method
from .tokens import Example, collate

TERM_DTYPE = torch.float64


class TokenTermCollector:
    """Per-module, per-position terms ``g_tᵀ u_r a_t`` of one document, for R query vectors.

    Args:
        vectors: ``{name: [R, r_out, r_in]}`` query vectors (projected ``û`` or exact ``u``),
            or ``{name: (left [R, d_out, r], right [R, d_in', r])}`` low-rank factors
            (``scoring.mode: exact``, :mod:`ray_influence.lowrank`), whose terms are
            ``Σ_k (L_kᵀ g_t)(R_kᵀ a_t)``, the inner sums of the document's exact-pass score.
        projections: per-module projections when ``vectors`` are projected; None when exact.
    """

    samples = 1

    def __init__(self, vectors: Mapping[str, torch.Tensor], projections: Mapping[str, Projection] | None):
        self._u = vectors
        self._proj = projections
        self.terms: dict[str, torch.Tensor] = {}

    def keep_input(self, name: str, a: torch.Tensor) -> torch.Tensor:
        a = a.to(TERM_DTYPE)
        return project_activations(a, self._proj[name]) if self._proj is not None else a  # [1, T, r_in]

    def on_grad(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        g = g.to(TERM_DTYPE)
        if self._proj is not None:
            g = project_gradients(g, self._proj[name])  # [1, T, r_out]
        u = self._u[name]
        if isinstance(u, tuple):
            left, right = (f.to(device=g.device, dtype=TERM_DTYPE) for f in u)
            self.terms[name] = lowrank_token_terms(a, g, left, right).cpu()  # [R, T]
            return
        u = u.to(device=g.device, dtype=TERM_DTYPE)  # [R, r_out, r_in]
        self.terms[name] = torch.einsum("bto,roi,bti->rt", g, u, a).cpu()  # [R, T]

    def result(self) -> torch.Tensor:
        """``[M, R, T]`` terms, modules in ``vectors`` order."""
        return torch.stack([self.terms[n] for n in self._u])


def split_flat(flat: torch.Tensor, shapes: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Flat query vectors ``[R, Σ_m r_m c_m]`` -> ``{name: [R, r_m, c_m]}`` (modules in ``shapes`` order)."""
    width = sum(r * c for r, c in shapes.values())
    if width != flat.shape[1]:
        raise ValueError(f"query vectors have {flat.shape[1]} columns; the tracked modules need {width}")
    out, start = {}, 0
    for name, (rows, cols) in shapes.items():
        out[name] = flat[:, start : start + rows * cols].reshape(-1, rows, cols)
        start += rows * cols
    return out


def token_terms(
    model: nn.Module,
    example: Example,
    specs: dict[str, ModuleSpec],
    vectors: Mapping[str, torch.Tensor],
    projections: Mapping[str, Projection] | None = None,
) -> torch.Tensor | None:
    """``[M, R, T]`` terms of one document: modules (``specs`` order), query vectors, positions.

    Summed over ``M`` and ``T`` they give ``<u_r, DW>`` (or ``<û_r, Ĝ>``). Returns None when
    the document's forward is not finite (no backward runs).
    """
    col = TokenTermCollector(vectors, projections)
    loss = run_pass(model, collate([example]), specs, col, Labels.DATA)
    if not bool(torch.isfinite(loss).all()):
        return None
    return torch.stack([col.terms[n] for n in specs])


@dataclass(frozen=True)
class DocRequest:
    """One top document to explain, and the (method, query index) pairs it is explained for.

    Attributes:
        part: the document's corpus partition.
        row: its row within the partition's file.
        position: its global position in this run (how the top-k names it).
        pairs: ``(method, query index in the stored query vectors)``.
    """

    part: Partition
    row: int
    position: int
    pairs: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class DocTerms:
    """What :func:`replica_token_terms` returns for one :class:`DocRequest`.

    Attributes:
        doc_id: the document's id.
        position: its global position in this run.
        tokens: its tokens as strings (``tokenizer.decode`` of each id).
        pairs: the request's pairs.
        per_token: ``[R, T]`` float64, summed over modules.
        per_module: ``[R, M]`` float64, summed over positions (modules in ``modules`` order).
        modules: tracked module names.
        blocks: the decoder block of each module.
    """

    doc_id: object
    position: int
    tokens: tuple[str, ...]
    pairs: tuple[tuple[str, int], ...]
    per_token: torch.Tensor
    per_module: torch.Tensor
    modules: tuple[str, ...]
    blocks: tuple[int, ...]


def replica_token_terms(replica, stage: str, requests: Sequence[DocRequest], sink) -> list[DocTerms]:
    """Runs on a replica's head: the terms of each requested document at ``stage``'s model.

    Args:
        replica: the :class:`ray_influence.replica.Replica` (its host's models, tokenizer and
            file cache); a sharded replica gathers every shard's modules.
        stage: ``pretrained`` or ``finetuned`` (the methods' document model).
        requests: the documents, each with the (method, query) pairs to explain.
        sink: the corpus pass's :class:`~ray_influence.corpus_sinks.CorpusSink`: the documents'
            norms (cosine methods) come from its pieces (index or top-k pieces).
    """
    from .score_stage import example_terms, module_table, query_sqnorms

    host = replica.host
    tok = host.tokenizer("pretrained")
    modules, blocks = module_table(replica, stage)
    query_sq = None
    doc_sq: dict[str, dict[int, float]] = {}
    out = []
    for req in requests:
        docs, _ = host.corpus_documents(req.part)
        doc = next(d for d in docs if d.row == req.row)
        example = host.corpus_examples([doc])[0]
        terms = example_terms(replica, stage, example, req.pairs)  # [M, R, T]
        if terms is None:
            continue
        scale = torch.ones(len(req.pairs), dtype=TERM_DTYPE)
        for r, (m, q) in enumerate(req.pairs):
            if Method.parse(m).cosine:
                if query_sq is None:
                    query_sq = query_sqnorms(replica)
                if req.part.key not in doc_sq:
                    doc_sq[req.part.key] = sink.doc_sqnorms(replica, stage, req.part)
                norm = (query_sq[m][q] * doc_sq[req.part.key][req.row]) ** 0.5
                scale[r] = 1 / max(norm, torch.finfo(TERM_DTYPE).tiny)
        terms = terms * scale[None, :, None]
        out.append(DocTerms(
            doc_id=doc.doc_id,
            position=req.position,
            tokens=tuple(tok.decode([i], clean_up_tokenization_spaces=False) for i in example.input_ids),
            pairs=req.pairs,
            per_token=terms.sum(0),
            per_module=terms.sum(2).T.contiguous(),
            modules=modules,
            blocks=blocks,
        ))
    return out


def influence_tables(terms: Sequence[DocTerms], query_ids: Sequence[Any],
                     ranks: Mapping[tuple[str, int, int], int]) -> dict[str, dict[str, pa.Table]]:
    """``{method: {"token_influence": table, "layer_influence": table}}``, rows by query, rank, token.

    ``token_influence``: query_id, doc_id, token_index, token, score (one row per token).
    ``layer_influence``: query_id, doc_id, module, block, score (one row per tracked module).

    Args:
        terms: what the workers returned.
        query_ids: the stored query ids (``DocRequest.pairs`` index them).
        ranks: ``(method, query index, position) -> rank`` in the results.
    """
    by_method: dict[str, list] = defaultdict(list)
    for d in terms:
        for r, (m, q) in enumerate(d.pairs):
            by_method[m].append((q, ranks[(m, q, d.position)], d, r))
    out = {}
    for m, items in by_method.items():
        items.sort(key=lambda x: (x[0], x[1]))
        tok: dict[str, list] = defaultdict(list)
        lay: dict[str, list] = defaultdict(list)
        for q, _, d, r in items:
            n = len(d.tokens)
            tok["query_id"] += [query_ids[q]] * n
            tok["doc_id"] += [d.doc_id] * n
            tok["token_index"] += range(n)
            tok["token"] += d.tokens
            tok["score"] += d.per_token[r].tolist()
            lay["query_id"] += [query_ids[q]] * len(d.modules)
            lay["doc_id"] += [d.doc_id] * len(d.modules)
            lay["module"] += d.modules
            lay["block"] += d.blocks
            lay["score"] += d.per_module[r].tolist()
        out[m] = {
            "token_influence": pa.table({
                "query_id": tok["query_id"], "doc_id": tok["doc_id"],
                "token_index": pa.array(tok["token_index"], pa.int32()),
                "token": pa.array(tok["token"], pa.string()), "score": pa.array(tok["score"], pa.float64()),
            }),
            "layer_influence": pa.table({
                "query_id": lay["query_id"], "doc_id": lay["doc_id"],
                "module": pa.array(lay["module"], pa.string()), "block": pa.array(lay["block"], pa.int32()),
                "score": pa.array(lay["score"], pa.float64()),
            }),
        }
    return out
