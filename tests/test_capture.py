"""Per-document gradients from captured a and g equal autograd's weight gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_examples
from ray_influence.attribution import document_gradients
from ray_influence.modules import find_tracked_modules
from ray_influence.passes import Labels, run_pass
from ray_influence.collectors import GradientCollector
from ray_influence.tokens import collate

ATOL = 1e-10  # float64 round-off on tiny models


def brute_force_gradients(model, example, specs):
    """Weight gradients of one example's summed loss, by plain autograd on a trainable copy."""
    m = copy.deepcopy(model)
    m.requires_grad_(True)
    ids = torch.tensor([example.input_ids])
    logits = m(input_ids=ids).logits[0, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    mask = torch.tensor(example.loss_mask[1:], dtype=logp.dtype)
    (-(logp * mask).sum()).backward()
    mods = dict(m.named_modules())
    out = {}
    for name, spec in specs.items():
        mod = mods[name]
        out[name] = spec.weight_grad_to_canonical(mod.weight.grad, mod.bias.grad if spec.bias else None)
    return out


@pytest.mark.parametrize("prompt_len", [0, 2])
def test_per_document_gradients_match_autograd(model64, arch, prompt_len):
    specs = find_tracked_modules(model64)
    examples = random_examples(4, prompt_len=prompt_len, seed=prompt_len)
    assert len({len(e) for e in examples}) > 1, "the batch must carry padding"
    got = document_gradients(model64, examples, specs, max_tokens=10_000)  # one padded batch
    kinds = {(s.transposed, s.bias) for s in specs.values()}
    for i, ex in enumerate(examples):
        want = brute_force_gradients(model64, ex, specs)
        for name in specs:
            diff = (got.grads[name][i] - want[name]).abs().max().item()
            assert diff < ATOL, f"{arch} {name} doc {i}: max |diff| {diff:.3e}"
    expected_kinds = {"gpt2": {(True, True)}, "llama": {(False, False)}}.get(arch, {(False, True)})
    assert kinds == expected_kinds


def test_no_weight_gradients(model64):
    specs = find_tracked_modules(model64)
    batch = collate(random_examples(3))
    run_pass(model64, batch, specs, GradientCollector(specs), Labels.DATA)
    assert all(p.grad is None for p in model64.parameters())
    assert not any(p.requires_grad for p in model64.parameters())


def test_unfrozen_model_is_refused(model64):
    specs = find_tracked_modules(model64)
    m = copy.deepcopy(model64).requires_grad_(True)
    with pytest.raises(ValueError, match="require grad"):
        run_pass(m, collate(random_examples(2)), specs, GradientCollector(specs), Labels.DATA)


def test_hooks_are_removed_after_an_error(model64):
    specs = find_tracked_modules(model64)

    class Boom(GradientCollector):
        def on_grad(self, name, a, g):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_pass(model64, collate(random_examples(2)), specs, Boom(specs), Labels.DATA)
    mods = dict(model64.named_modules())
    assert all(not mods[n]._forward_hooks for n in specs)


def test_collected_tensors_hold_no_graph(model64):
    from ray_influence.attribution import covariance_pass, fit_factors
    specs = find_tracked_modules(model64)
    docs = random_examples(3)
    cov = covariance_pass(model64, docs, specs)
    factors = fit_factors(model64, docs, specs)
    grads = document_gradients(model64, docs, specs).grads
    for n in specs:
        assert not (cov[n].a_sum.requires_grad or cov[n].g_sum.requires_grad or factors[n].lam.requires_grad)
        assert not grads[n].requires_grad
