"""Scoring methods end to end on a tiny model: decompositions and limits."""

from __future__ import annotations

import pytest
import torch

from conftest import random_examples
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
    assert (total - per_module).abs().max() < 1e-9 * total.abs().max()


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
    plain = flatten(queries, names) @ flatten(docs, names).T
    assert (by[Method.GRAD_DOT] - plain).abs().max() < 1e-12
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
