"""Label sampling of the true-Fisher passes: deterministic per row, and from the model."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, random_examples
from ray_influence.passes import Labels, _finite_positions, _sample_targets, loss_terms
from ray_influence.tokens import collate

FREQ_TOL = 0.02  # |empirical - model| probability with 40 000 draws per position (sd <= 0.0025)


def test_sampled_labels_do_not_depend_on_the_batch():
    docs = random_examples(7, seed=3, prompt_len=2)
    vocab = 11
    gen = torch.Generator().manual_seed(0)
    # Each row's log-probabilities depend only on its key, so any batch gives it the same ones.
    table = {e.key: torch.log_softmax(torch.randn(20, vocab, generator=gen, dtype=torch.float64), -1) for e in docs}

    def labels(group):
        batch = collate(group)
        t = batch.input_ids.shape[1] - 1
        logits = torch.stack([table[e.key][:t] for e in group])  # [B, T-1, V]
        drawn = _sample_targets(logits.exp(), batch, seed=5, pass_name="fisher", samples=3)  # [S, B, T-1]
        return {e.key: drawn[:, row, : len(e) - 1] for row, e in enumerate(group)}

    alone = {e.key: labels([e])[e.key] for e in docs}
    together = labels(docs)
    reordered = labels(docs[::-1][:4]) | labels(docs[::-1][4:])
    for e in docs:
        mask = torch.tensor(e.loss_mask[1:])
        assert torch.equal(together[e.key], alone[e.key]), e.key
        assert torch.equal(reordered[e.key], alone[e.key]), e.key
        assert bool((alone[e.key][:, ~mask] == 0).all()), "positions outside the loss must stay 0"
    other_seed = collate(docs)
    logits = torch.stack([table[e.key][: other_seed.input_ids.shape[1] - 1] for e in docs])
    assert not torch.equal(_sample_targets(logits.exp(), other_seed, 6, "fisher", 3),
                           _sample_targets(logits.exp(), other_seed, 5, "fisher", 3))


def test_several_samples_are_the_draws_of_a_per_row_multinomial():
    """For S > 1 the batched sampler reproduces CPU torch.multinomial(replacement=True) row by row."""
    from ray_influence.projection import stable_seed

    docs = random_examples(5, seed=8, prompt_len=2)
    batch = collate(docs)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(len(docs), batch.input_ids.shape[1] - 1, 13, generator=gen, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    drawn = _sample_targets(probs, batch, seed=2, pass_name="fisher", samples=4)  # [S, B, T-1]
    for row, e in enumerate(docs):
        pos = batch.loss_mask[row, 1:].nonzero(as_tuple=True)[0]
        g = torch.Generator().manual_seed(stable_seed("labels", 2, "fisher", e.key))
        want = torch.multinomial(probs[row, pos], 4, replacement=True, generator=g)  # [n_pos, S]
        assert torch.equal(drawn[:, row, pos], want.T), e.key


def test_sampled_labels_follow_the_model():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float32)
    ex = random_examples(1, min_len=3, max_len=3)[0]
    batch = collate([ex])
    n = 40_000
    drawn = _sample_targets(probs[None], batch, 0, "fisher", n)[:, 0]  # [S, 2]: [1, T-1 = 2, V = 5] probabilities
    for pos in range(2):
        freq = torch.bincount(drawn[:, pos], minlength=5).double() / n
        assert (freq - probs[pos].double()).abs().max() < FREQ_TOL, (pos, freq.tolist())
        assert bool((freq[probs[pos] == 0] == 0).all()), "a token of probability 0 was drawn"


def test_finite_positions_is_exact():
    x = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    x[0, 1, 3] = float("nan")
    x[1, 2, 0] = float("-inf")
    x[1, 3, :] = 3e38  # finite logits whose sum overflows
    want = torch.isfinite(x).all(-1)
    assert torch.equal(_finite_positions(x), want)
    assert bool(_finite_positions(torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_closed_form_logits_gradient_is_autograds(dtype):
    """``loss_terms``' backward equals autograd through log-softmax, for every label sample."""
    docs = random_examples(4, seed=9, prompt_len=2)
    batch = collate(docs)
    gen = torch.Generator().manual_seed(3)
    b, t, d, v, samples = *batch.input_ids.shape, 6, VOCAB, 3
    w = torch.randn(d, v, generator=gen, dtype=torch.float64)
    x = torch.randn(b, t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        logits = (x @ w).to(dtype)  # [B, T, V]
        _, backward = loss_terms(logits, batch, Labels.SAMPLED, 4, "fisher", samples)
        got = backward(x)
        with pytest.raises(RuntimeError, match="once"):
            backward(x)
        upcast = (x @ w).to(dtype).to(torch.promote_types(dtype, torch.float32))  # a fresh graph
        logp = torch.log_softmax(upcast[:, :-1], -1)
        targets = _sample_targets(logp.detach().exp(), batch, 4, "fisher", samples)  # [S, B, T-1]
        weights = batch.loss_mask[:, 1:].to(logp.dtype)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for s in range(samples):
            loss = -(logp.gather(-1, targets[s][..., None]).squeeze(-1) * weights).sum()
            want = torch.autograd.grad(loss, x, retain_graph=True)[0]
            err = float((got[s] - want).abs().max() / want.abs().max())
            assert err <= tol, f"{dtype} sample {s}: max |diff| / max |want| = {err:.3e} > {tol:.0e}"
