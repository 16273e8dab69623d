"""Scoring methods end to end on a tiny model: decompositions and limits."""

from __future__ import annotations

import pytest
import torch

from conftest import random_examples
from precision import FLOAT64_RTOL, assert_close
from ray_influence.attribution import document_gradients, fit_factors, influence_scores
from ray_influence.ekfac import Fisher, ModuleFactors
from ray_influence.modules import find_tracked_modules
from ray_influence.scoring import Method, flatten, query_vectors, scores, top_k


@pytest.fixture(scope="module")
def world(model64):
    specs = find_tracked_modules(model64)
    ft = fit_factors(model64, random_examples(8, seed=1, prompt_len=2), specs, Fisher.TRUE, seed=1)
    pt = fit_factors(model64, random_examples(8, seed=2), specs, Fisher.TRUE, seed=2)
    docs = document_gradients(model64, random_examples(6, seed=3), specs).grads
    queries = document_gradients(model64, random_examples(2, seed=4, prompt_len=2), specs).grads
    return specs, ft, pt, docs, queries


def test_per_module_scores_sum_to_total(world):
    specs, ft, pt, docs, queries = world
    names = list(specs)
    total = influence_scores(Method.MULTI_STAGE, queries, docs, names, ft, pt)
    per_module = sum(influence_scores(Method.MULTI_STAGE, queries, docs, [n], ft, pt) for n in names)
    assert_close(per_module, total, 1e-9, "sum of per-module scores vs total")


def test_large_finetune_damping_tends_to_pretrain_only(world):
    """As λ_ft grows, λ_ft * multi_stage -> <(H_pt+λ_pt)^-1 g_q, DW>."""
    specs, ft, pt, docs, queries = world
    names = list(specs)
    huge = {n: ModuleFactors(f.q_a, f.q_g, f.lam, 1e9, f.n_tokens, f.n_docs) for n, f in ft.items()}
    ms = influence_scores(Method.MULTI_STAGE, queries, docs, names, huge, pt) * 1e9
    pt_only = scores(flatten(query_vectors(Method.SINGLE_STAGE, queries, pt, None), names), flatten(docs, names))
    assert ((ms - pt_only).abs().max() / pt_only.abs().max()).item() < 1e-6


def test_methods_differ_and_grad_dot_is_a_plain_dot(world):
    specs, ft, pt, docs, queries = world
    names = list(specs)
    by = {m: influence_scores(m, queries, docs, names, ft, pt) for m in Method}
    q, d = flatten(queries, names), flatten(docs, names)
    plain = q @ d.T
    # A dot product's round-off is relative to |q| |d| (Cauchy-Schwarz), not to the score.
    assert_close(by[Method.GRAD_DOT], plain, FLOAT64_RTOL, "grad_dot vs q @ d^T",
                 scale=float((q.norm(dim=1)[:, None] * d.norm(dim=1)[None, :]).max()))
    assert (by[Method.MULTI_STAGE] - by[Method.SINGLE_STAGE]).abs().max() > 1e-6
    assert by[Method.GRAD_COS].abs().max() <= 1 + 1e-12


def test_top_k_is_descending_and_stable():
    s = torch.tensor([[0.1, 0.5, 0.5, -1.0, 0.7]], dtype=torch.float64)
    values, idx = top_k(s, 3)
    assert idx.tolist() == [[4, 1, 2]] and values.tolist() == [[0.7, 0.5, 0.5]]
    assert top_k(s, 10)[1].shape == (1, 5)
    with pytest.raises(ValueError, match="0"):
        top_k(s, 0)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="'tracin'"):
        Method.parse("tracin")


def reference_top_k(values: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[list, list]:
    """Top-k by plain Python sorting on (-score, position): the documented order."""
    vals, poss = [], []
    for v_row, p_row in zip(values.tolist(), positions.tolist()):
        best = sorted(zip(v_row, p_row), key=lambda vp: (-vp[0], vp[1]))[:k]
        vals.append([v for v, _ in best])
        poss.append([p for _, p in best])
    return vals, poss


@pytest.mark.parametrize("levels", [3, 40, 0])  # few distinct scores (many ties), some, all distinct
@pytest.mark.parametrize("k", [1, 5, 37, 200])
def test_top_k_matches_a_plain_sort_including_ties(levels, k):
    gen = torch.Generator().manual_seed(levels * 1000 + k)
    q, m = 6, 150
    values = torch.randn(q, m, generator=gen, dtype=torch.float64)
    if levels:
        values = torch.randint(0, levels, (q, m), generator=gen).to(torch.float64)
    positions = torch.stack([torch.randperm(10 * m, generator=gen)[:m] for _ in range(q)])  # scrambled, unique
    got_v, got_p = top_k(values, k, positions)
    want_v, want_p = reference_top_k(values, positions, k)
    assert got_p.tolist() == want_p, f"levels={levels} k={k}: positions differ"
    assert got_v.tolist() == want_v
    shared = torch.randperm(m, generator=gen)  # one [M] positions vector for every row
    got_v, got_p = top_k(values, k, shared)
    want_v, want_p = reference_top_k(values, shared.expand(q, -1), k)
    assert got_p.tolist() == want_p and got_v.tolist() == want_v


def test_block_scores_equal_one_matmul():
    from ray_influence.scoring import BlockScores

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    docs = torch.randn(23, 50, generator=gen, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        stored = docs.to(dtype)
        bs = BlockScores({"a": u, "b": 2 * u})
        for r0 in range(0, 23, 7):
            bs.add(stored[r0:r0 + 7])
        out = bs.result()
        want = u @ stored.to(torch.float64).T
        assert out["a"].dtype == torch.float64 and out["a"].shape == (3, 23)
        err = ((out["a"] - want).abs().max() / want.abs().max()).item()
        assert err < tol, f"{dtype}: relative error {err:.2e}"
        # 2u d is 2 (u d) exactly when summed in the same order; else to the precision of ``dtype``.
        if not torch.equal(out["b"], 2 * out["a"]):
            assert_close(out["b"], 2 * out["a"], tol, f"{dtype}: scores of 2u vs 2 x scores of u")
