"""Per-document gradients from captured a and g equal autograd's weight gradients."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from conftest import random_examples
from precision import (FLOAT32_RTOL, FLOAT64_RTOL, assert_close, float32_steps, hf_float64, perturbed_float32_steps,
                       rtol_of, watch_float32_steps)
from ray_influence.attribution import document_gradients
from ray_influence.modules import find_tracked_modules
from ray_influence.passes import Labels, run_pass
from ray_influence.collectors import GradientCollector
from ray_influence.tokens import collate


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


@pytest.mark.parametrize("hf", ["float64", "as_is"])
@pytest.mark.parametrize("prompt_len", [0, 2])
def test_per_document_gradients_match_autograd(model64, arch, prompt_len, hf):
    """One padded batch against autograd on each document alone.

    ``hf="float64"``: HF's float32 steps run in float64 (:func:`precision.hf_float64`), so
    both sides are float64 throughout and agree to FLOAT64_RTOL on every architecture.
    ``hf="as_is"``: the HF forward as it is; padding changes the float32 round-off of a
    float32 step (Bloom's softmax sums over the padded row), so the bound is that of the
    precision the model really computes in (:func:`precision.rtol_of`).
    """
    specs = find_tracked_modules(model64)
    examples = random_examples(4, prompt_len=prompt_len, seed=prompt_len)
    assert len({len(e) for e in examples}) > 1, "the batch must carry padding"
    if hf == "float64":
        rtol, mode = FLOAT64_RTOL, hf_float64
    else:
        rtol, mode = rtol_of(model64), contextlib.nullcontext
    with mode():
        got = document_gradients(model64, examples, specs, max_tokens=10_000)  # one padded batch
        want = [brute_force_gradients(model64, ex, specs) for ex in examples]
    kinds = {(s.transposed, s.bias) for s in specs.values()}
    for i in range(len(examples)):
        for name in specs:
            assert_close(got.grads[name][i], want[i][name], rtol, f"{arch} {hf} {name} doc {i}")
    expected_kinds = {"gpt2": {(True, True)}, "llama": {(False, False)}}.get(arch, {(False, True)})
    assert kinds == expected_kinds


def test_float32_steps_of_the_hf_forward(model64, arch):
    """The float32 steps each float64 model takes in its HF code, which set its as-is bound."""
    expected = {"bloom": {"BloomAttention.forward softmax"},
                "llama": {"LlamaRMSNorm.forward to", "LlamaRotaryEmbedding.forward to"},
                "gpt_neox": {"GPTNeoXRotaryEmbedding.forward to"}, "gpt2": set()}[arch]
    steps = {s.split(":", 1)[1] for s in float32_steps(model64)}
    assert steps == expected, f"{arch}: float32 steps {sorted(steps)}; expected {sorted(expected)}"
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad(), watch_float32_steps() as left, hf_float64() as changed:
        model64(input_ids=ids)
    assert {s.split(":", 1)[1] for s in changed} == expected, f"{arch}: hf_float64 changed {sorted(changed)}"
    assert not left, f"{arch}: hf_float64 left float32 steps {sorted(left)}"


def test_as_is_bound_covers_moved_float32_round_off(model64, arch):
    """FLOAT32_RTOL holds when every data-dependent float32 step is moved by 2 ulps per call.

    That is more than another padding or another machine moves them, so the as-is bound of
    test_per_document_gradients_match_autograd does not rest on this machine's rounding;
    and the moved round-off exceeds FLOAT64_RTOL, so that bound could not be the float64 one.
    """
    specs = find_tracked_modules(model64)
    examples = random_examples(4, prompt_len=2, seed=2)
    with perturbed_float32_steps(ulps=2) as moved:
        got = document_gradients(model64, examples, specs, max_tokens=10_000)
        want = [brute_force_gradients(model64, ex, specs) for ex in examples]
    if arch in ("gpt2", "gpt_neox"):  # no float32 step, or only a table of positions (rotary angles)
        assert moved.moved == 0, f"{arch}: {moved.moved} data-dependent float32 outputs"
        return
    assert moved.moved > 0
    worst = 0.0
    for i in range(len(examples)):
        for name in specs:
            assert_close(got.grads[name][i], want[i][name], FLOAT32_RTOL, f"{arch} moved {name} doc {i}")
            worst = max(worst, float((got.grads[name][i] - want[i][name]).abs().max() / want[i][name].abs().max()))
    assert worst > FLOAT64_RTOL, f"{arch}: moving the float32 steps changed nothing ({worst:.3e})"


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
