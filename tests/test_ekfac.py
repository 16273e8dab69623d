"""EK-FAC math against dense matrices in float64 (DESIGN.md §2)."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from conftest import random_examples
from precision import FLOAT64_RTOL, assert_rel, hf_float64, rtol_of
from ray_influence import ekfac
from ray_influence.attribution import covariance_pass, document_gradients, fit_factors, lambda_pass
from ray_influence.ekfac import Fisher, ModuleFactors, dense_ekfac, ihvp
from ray_influence.factors_io import load_factors, save_factors
from ray_influence.modules import find_tracked_modules
from ray_influence.scoring import multi_stage_vectors

# Float64 agreement for exact identities (precision.FLOAT64_RTOL, norm-wise: measured <= 3e-15).
# The models' comparisons across batchings run under precision.hf_float64, so that they are
# float64 throughout; the HF forward as it is has its own bound (test_factors_do_not_depend_on_batch_size).
EXACT = FLOAT64_RTOL
MC_REDUCTION = 0.5  # 8 label samples must at least halve the variance of G (expected 1/8)


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def random_factors(d_out: int, d_in: int, seed: int, damping: float = 0.1) -> ModuleFactors:
    gen = torch.Generator().manual_seed(seed)
    lam = torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) ** 3 * 5  # spread spectrum
    return ModuleFactors(random_orthogonal(d_in, gen), random_orthogonal(d_out, gen), lam, damping, 1, 1)


def dense(f: ModuleFactors) -> torch.Tensor:
    return dense_ekfac(f.q_a, f.q_g, f.lam)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def solve_rtol(h: torch.Tensor) -> float:
    """Bound of ||H^-1 (H v) - v|| / ||v||: the float64 round-off times the condition number of H."""
    return float(torch.linalg.cond(h)) * FLOAT64_RTOL


def test_ihvp_inverts_the_dense_damped_matrix():
    f = random_factors(5, 7, seed=0, damping=0.03)
    h = dense(f) + f.damping * torch.eye(35, dtype=torch.float64)
    v = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hv = (h @ v.reshape(3, -1).T).T.reshape(3, 5, 7)
    back = ihvp(hv, f)
    assert_rel(back, v, solve_rtol(h), "ihvp(Hv) vs v")
    assert torch.equal(f.lam, random_factors(5, 7, seed=0).lam), "ihvp must not mutate Λ"


def test_ihvp_on_fitted_factors(model64):
    specs = find_tracked_modules(model64)
    factors = fit_factors(model64, random_examples(12), specs, Fisher.TRUE, samples=2, seed=3)
    name = next(iter(specs))
    f = factors[name]
    n = f.lam.numel()
    h = dense(f) + f.damping * torch.eye(n, dtype=torch.float64)
    v = torch.randn(f.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    back = ihvp((h @ v.reshape(-1)).reshape(f.shape), f)
    assert_rel(back, v, solve_rtol(h), "ihvp(Hv) vs v")
    # auto damping is 0.1 * mean(Λ), per module
    assert f.damping == pytest.approx(0.1 * f.lam.mean().item(), rel=1e-12)
    # auto*C is C times that (the form the damping sweep of jobs/bench_quality.py uses)
    for spec, scale in (("auto*10", 10.0), ("auto * 0.01", 0.01), ("auto", 1.0)):
        assert ekfac.resolve_damping(f.lam, spec) == pytest.approx(scale * f.damping, rel=1e-12), spec


def test_ekfac_is_closer_to_the_exact_fisher_than_kfac(model64, arch):
    """On every tracked module, ||F - EKFAC||_F <= ||F - KFAC||_F < ||F||_F (George et al.)."""
    specs = find_tracked_modules(model64)
    docs = random_examples(10, seed=1)
    factors = fit_factors(model64, docs, specs, Fisher.EMPIRICAL)
    cov = covariance_pass(model64, docs, specs, Fisher.EMPIRICAL)
    dw = document_gradients(model64, docs, specs).grads
    for name, f in factors.items():
        flat = dw[name].reshape(len(docs), -1)
        exact = flat.T @ flat / len(docs)  # per-document Fisher of the summed loss
        c = cov[name]
        tokens_per_doc = c.n_tokens / len(docs)
        kfac = tokens_per_doc * torch.kron(c.g_sum / c.n_tokens, c.a_sum / c.n_tokens)
        err_ek = (exact - dense(f)).norm().item()
        err_k = (exact - kfac).norm().item()
        assert err_ek <= err_k * (1 + 1e-12), f"{arch} {name}: EK-FAC error {err_ek:.4g} > K-FAC {err_k:.4g}"
        assert err_ek < exact.norm().item(), f"{arch} {name}: EK-FAC is no approximation at all"
        # Λ is exactly the diagonal of F in the Kronecker eigenbasis (one batch on both sides).
        q = torch.kron(f.q_g, f.q_a)
        assert_rel(torch.diagonal(q.T @ exact @ q), f.lam.reshape(-1), EXACT, f"{arch} {name}: diag(Q^T F Q) vs Λ")


def test_multi_stage_order_matches_dense_product():
    name = "m"
    ft = {name: random_factors(4, 6, seed=1, damping=0.05)}
    pt = {name: random_factors(4, 6, seed=2, damping=0.2)}
    g = torch.randn(2, 4, 6, dtype=torch.float64)
    eye = torch.eye(24, dtype=torch.float64)
    h_ft = dense(ft[name]) + 0.05 * eye
    h_pt = dense(pt[name]) + 0.2 * eye
    assert (h_ft @ h_pt - h_pt @ h_ft).norm() > 1e-3, "the test needs non-commuting curvatures"
    want = torch.linalg.solve(h_pt, torch.linalg.solve(h_ft, g.reshape(2, -1).T)).T.reshape(2, 4, 6)
    reversed_ = torch.linalg.solve(h_ft, torch.linalg.solve(h_pt, g.reshape(2, -1).T)).T.reshape(2, 4, 6)
    got = multi_stage_vectors({name: g}, ft, pt)[name]
    assert_rel(got, want, EXACT, "multi-stage vectors vs dense solves")
    assert rel(got, reversed_) > 1e-2, "multi-stage must not equal the reversed order"


LAMBDA_BASIS_RTOL = 1e-9
"""Λ of two fits is compared in each fit's own eigenbasis, which round-off may turn inside
near-degenerate eigenspaces of A and G; measured 3e-15 in float64, kept at the original 1e-9."""


@pytest.mark.parametrize("hf", ["float64", "as_is"])
def test_factors_do_not_depend_on_batch_size(model64, arch, hf):
    """Batches of one or two documents and one batch of nine give the same sums and factors.

    ``hf="float64"``: float64 throughout (:func:`precision.hf_float64`), so the sums agree to
    EXACT. ``hf="as_is"``: batch composition moves the float32 round-off of a model's float32
    step (Bloom's softmax), so the sums agree to the bound of the precision the model really
    computes in (:func:`precision.rtol_of`), and Λ too: norm-wise it moves no more than the
    sums (measured with every float32 step moved by 2 ulps, precision.perturbed_float32_steps:
    <= 6e-7). Λ's bound is never below LAMBDA_BASIS_RTOL.
    """
    specs = find_tracked_modules(model64)
    docs = random_examples(9, seed=4)
    if hf == "float64":
        rtol, mode = EXACT, hf_float64
    else:
        rtol, mode = rtol_of(model64), contextlib.nullcontext
    lam_rtol = max(LAMBDA_BASIS_RTOL, rtol)
    with mode():
        small = fit_factors(model64, docs, specs, Fisher.TRUE, samples=2, seed=5, max_tokens=12)
        big = fit_factors(model64, docs, specs, Fisher.TRUE, samples=2, seed=5, max_tokens=10_000)
        cs = covariance_pass(model64, docs, specs, Fisher.TRUE, 2, 5, max_tokens=12)
        cb = covariance_pass(model64, docs, specs, Fisher.TRUE, 2, 5, max_tokens=10_000)
    for n in specs:
        assert_rel(cs[n].a_sum, cb[n].a_sum, rtol, f"{arch} {hf} {n} A")
        assert_rel(cs[n].g_sum, cb[n].g_sum, rtol, f"{arch} {hf} {n} G")
        assert cs[n].n_tokens == cb[n].n_tokens == sum(len(d) for d in docs)
        assert_rel(small[n].lam, big[n].lam, lam_rtol, f"{arch} {hf} {n} Λ")
        assert small[n].n_docs == big[n].n_docs == 9


def test_label_samples_reduce_variance(model64):
    specs = find_tracked_modules(model64)
    name = list(specs)[-1]
    docs = random_examples(4, seed=6)

    def spread(samples: int) -> float:
        gs = torch.stack([covariance_pass(model64, docs, specs, Fisher.TRUE, samples, seed)[name].g_sum
                          for seed in range(8)])
        return gs.var(dim=0).sum().item()

    one, eight = spread(1), spread(8)
    assert eight < MC_REDUCTION * one, f"var with 8 samples {eight:.3g} vs 1 sample {one:.3g}"


def test_true_and_empirical_fisher_differ(model64):
    specs = find_tracked_modules(model64)
    docs = random_examples(4, seed=7)
    name = list(specs)[0]
    true = covariance_pass(model64, docs, specs, Fisher.TRUE)[name].g_sum
    emp = covariance_pass(model64, docs, specs, Fisher.EMPIRICAL)[name].g_sum
    assert rel(true, emp) > 1e-3


def test_factors_round_trip(tmp_path, model64):
    specs = find_tracked_modules(model64)
    factors = fit_factors(model64, random_examples(5), specs)
    url = str(tmp_path / "factors.safetensors")
    save_factors(url, factors, {"fisher": "true", "stage": "pretrained"})
    back, meta = load_factors(url)
    assert meta["fisher"] == "true" and meta["dtype"] == "float64"
    assert set(meta["modules"]) == set(specs)
    for n, f in factors.items():
        b = back[n]
        assert torch.equal(b.q_a, f.q_a) and torch.equal(b.q_g, f.q_g) and torch.equal(b.lam, f.lam)
        assert (b.damping, b.n_tokens, b.n_docs) == (f.damping, f.n_tokens, f.n_docs)
        assert meta["modules"][n]["shape"] == list(f.shape)


def test_bad_inputs_name_the_value(model64):
    with pytest.raises(ValueError, match="'bogus'"):
        Fisher.parse("bogus")
    with pytest.raises(ValueError, match="nothing_matches"):
        find_tracked_modules(model64, include=["nothing_matches*"])
    f = random_factors(3, 4, seed=0)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        ihvp(torch.zeros(2, 5), f)
    with pytest.raises(ValueError, match="'big'"):
        ekfac.resolve_damping(torch.ones(2, 2), "big")
    for bad in ("auto*0", "auto*-2", "auto*nan", "auto*", "auto**2"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            ekfac.resolve_damping(torch.ones(2, 2), bad)
    a = ekfac.CovarianceStats(torch.zeros(2, 2), torch.zeros(3, 3), 1)
    b = ekfac.CovarianceStats(torch.zeros(4, 4), torch.zeros(3, 3), 1)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        a + b
    with pytest.raises(ValueError, match="n_tokens=0"):
        ekfac.eigenbasis(ekfac.CovarianceStats(torch.zeros(2, 2), torch.zeros(2, 2), 0))


def test_lambda_pass_uses_the_given_basis(model64):
    specs = find_tracked_modules(model64)
    docs = random_examples(3)
    name = list(specs)[0]
    spec = specs[name]
    eye = ekfac.Eigenbasis(torch.eye(spec.d_in_aug, dtype=torch.float64), torch.ones(spec.d_in_aug),
                           torch.eye(spec.d_out, dtype=torch.float64), torch.ones(spec.d_out))
    lam = lambda_pass(model64, docs, {name: spec}, {name: eye}, Fisher.EMPIRICAL)[name]
    dw = document_gradients(model64, docs, {name: spec}).grads[name]  # the same one batch
    assert_rel(lam.lam_sum, dw.square().sum(0), EXACT, f"{name}: Λ sum vs DW^2")
    assert lam.n_docs == 3


def test_blocked_outer_sum_and_chunked_lambda_sum_are_the_plain_products():
    gen = torch.Generator().manual_seed(0)
    d = 2 * ekfac.OUTER_BLOCK + 37  # takes the blocked path, with a ragged last block
    x = torch.randn(3, 40, d, generator=gen, dtype=torch.float64)
    x2 = x.reshape(-1, d)
    got = ekfac.outer_sum(x)
    assert_rel(got, x2.T @ x2, EXACT, "blocked outer sum")
    assert torch.equal(got, got.T)
    a = torch.randn(9, 6, 300, generator=gen, dtype=torch.float64)  # more documents than one Λ chunk holds
    g = torch.randn(9, 6, 400, generator=gen, dtype=torch.float64)
    assert ekfac.LAMBDA_CHUNK // (300 * 400) < 9
    want = torch.einsum("bto,bti->boi", g, a).square().sum(0)
    assert_rel(ekfac.lambda_sum(a, g), want, EXACT, "chunked Λ sum")


def test_lambda_sum_rotates_per_token_or_per_document_alike():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(5, 7, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 7, 4, generator=gen, dtype=torch.float64)
    q_a, q_g = random_orthogonal(6, gen), random_orthogonal(4, gen)
    want = (q_g.T @ torch.einsum("bto,bti->boi", g, a) @ q_a).square().sum(0)
    for a_tok in (True, False):
        for g_tok in (True, False):
            got = ekfac.lambda_sum(a @ q_a if a_tok else a, g @ q_g if g_tok else g,
                                   None if a_tok else q_a, None if g_tok else q_g)
            assert_rel(got, want, EXACT, f"Λ sum, rotated per token: a {a_tok} g {g_tok}")


def test_rotation_side_follows_the_cheaper_product():
    # a: T d_in'^2 once vs samples d_out d_in'^2 per document; g: T d_out^2 vs d_out^2 d_in'.
    assert ekfac.rotates_per_token(100, 257, 1024) == (True, True)
    assert ekfac.rotates_per_token(512, 257, 1024) == (True, False)  # MLP up, long documents
    assert ekfac.rotates_per_token(512, 1025, 256) == (False, True)  # MLP down
    assert ekfac.rotates_per_token(512, 1025, 256, samples=4) == (True, True)  # samples share a's rotation


def test_lambda_pass_on_long_documents_rotates_per_document(model64):
    # Documents longer than every module's width (d_in' = 9, d_out <= 32) take the
    # per-document rotation; short ones the per-token one. Both give (Q_G^T DW Q_A)^2.
    # The two sides batch differently (64 tokens, one batch): float64 throughout (hf_float64).
    specs = find_tracked_modules(model64)
    gen = torch.Generator().manual_seed(4)
    bases = {n: ekfac.Eigenbasis(random_orthogonal(s.d_in_aug, gen), torch.ones(s.d_in_aug),
                                 random_orthogonal(s.d_out, gen), torch.ones(s.d_out)) for n, s in specs.items()}
    docs = random_examples(10, min_len=3, max_len=48, seed=5)
    sides = {ekfac.rotates_per_token(len(d), s.d_in_aug, s.d_out) for d in docs for s in specs.values()}
    assert {(True, True), (False, False)} <= sides
    with hf_float64():
        lam = lambda_pass(model64, docs, specs, bases, Fisher.EMPIRICAL, max_tokens=64)
        dw = document_gradients(model64, docs, specs).grads
    for n, b in bases.items():
        assert_rel(lam[n].lam_sum, (b.q_g.T @ dw[n] @ b.q_a).square().sum(0), EXACT, f"{n}: Λ sum")


@pytest.mark.parametrize("sides", [(False, False), (True, False), (False, True)])
def test_lambda_pass_per_document_rotation_with_label_samples(model64, monkeypatch, sides):
    # The true Fisher with 2 samples: per-token a is shared by the samples, DW is per sample.
    specs = find_tracked_modules(model64)
    cov = covariance_pass(model64, random_examples(6), specs, Fisher.TRUE, samples=2, seed=1)
    bases = {n: ekfac.eigenbasis(c) for n, c in cov.items()}
    docs = random_examples(6, max_len=12)
    monkeypatch.setattr(ekfac, "rotates_per_token", lambda *args: (True, True))
    want = lambda_pass(model64, docs, specs, bases, Fisher.TRUE, samples=2, seed=1)
    monkeypatch.setattr(ekfac, "rotates_per_token", lambda *args: sides)
    got = lambda_pass(model64, docs, specs, bases, Fisher.TRUE, samples=2, seed=1)
    for n in specs:
        assert_rel(got[n].lam_sum, want[n].lam_sum, EXACT, f"{n} sides {sides}: Λ sum")


def test_rotations_on_aligned_rows():
    gen = torch.Generator().manual_seed(1)
    a = ekfac.aligned_empty((2, 5, 33), torch.float64, "cpu")
    a.copy_(torch.randn(2, 5, 33, generator=gen, dtype=torch.float64))
    assert a.stride(-2) % ekfac.ROW_ALIGN == 0 and a.reshape(-1, 33)._base is not None
    q = random_orthogonal(33, gen)
    got = ekfac.rotate_activations(a, q)
    assert got.shape == (2, 5, 33)
    assert_rel(got, a @ q, EXACT, "rotation of aligned rows")
