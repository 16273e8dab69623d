"""Tolerances derived from the arithmetic a code path really uses, and a float64 HF forward.

Unit round-off: float64 ``u64 = 2**-53 ≈ 1.1e-16``, float32 ``u32 = 2**-24 ≈ 6.0e-8``.

Two computations of the same quantity in one precision (another batch, another padding,
another order of a sum, another thread count) differ by the round-off of their sums: for
``n`` terms at most about ``n u`` times the sum of the terms' magnitudes. That is why
comparisons are made *relative to the magnitude of the values* (``atol = rtol * max|want|``
or a norm-wise ratio), never with one absolute constant for values of very different size.

- :data:`FLOAT64_RTOL` is for code paths that are float64 throughout.
- :data:`FLOAT32_RTOL` is for paths with a float32 step, such as the HF code of a float64
  model that upcasts or downcasts (:func:`float32_steps`). Two such computations differ by
  the float32 round-off of that step, whatever the rest computes in.

A "float64" model of transformers is not float64 throughout: Bloom's attention runs its
softmax with ``dtype=torch.float32`` and casts back; Llama's RMSNorm casts to float32 and
back; the rotary embeddings of Llama and GPT-NeoX compute their angles in float32.
:func:`hf_float64` runs those steps in float64 (inside a test, nothing patched or attached
to a model), so the float64 bound can be checked on every architecture.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

U64 = 2.0**-53
U32 = 2.0**-24

FLOAT64_RTOL = 1e-12
"""Float64 throughout: ~1e4 u64. The compared values are sums of at most ~1e4 terms
(tokens x module widths of the tiny models, through two blocks, forward and backward);
worst-case accumulated round-off ~n u64 of the terms' magnitudes, measured ~1e-15."""

FLOAT32_RTOL = 64 * U32  # ≈ 3.8e-6
"""A float32 step: 64 u32. Two computations of a float32 step (another padding of Bloom's
softmax row, another reduction order of an RMSNorm) give outputs a few ulps apart: a
float32 sum of n terms is exact to (n - 1) u32 of them, and the rows here are <= 16
tokens. Moving every such output by up to 2 ulps at every call
(:func:`perturbed_float32_steps`) moves the tiny models' gradients and covariances by at
most 1.1e-6 of their magnitude (amplification <= ~10 per ulp; the unmoved difference on
this machine is <= 1e-9); 64 u32 leaves a margin of 3."""


def _caller() -> str:
    """``module:function`` of the innermost frame outside torch and this file (who asked for the op)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name != __name__ and not (name == "torch" or name.startswith("torch.")):
            return f"{name}:{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"
        frame = frame.f_back
    return ""


def _lowers_float64(func, args, kwargs) -> bool:
    """Whether this op takes a float64 tensor to float32 (a cast, or a softmax with dtype=float32)."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dtype != torch.float64:
        return False
    if func in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
                torch.Tensor.log_softmax):
        return kwargs.get("dtype") == torch.float32  # HF passes it by keyword
    if func is torch.Tensor.float:
        return True
    if func is torch.Tensor.to:
        dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
        return dtype is not None and dtype != torch.float64 and dtype.is_floating_point
    return False


class _HFFloat64(TorchFunctionMode):
    """Runs the float32 steps that transformers' code takes on float64 tensors in float64.

    Only ops called from ``transformers.*`` code are changed, so the package's own code
    runs as it is. Records what it found in ``self.seen`` ({"module:function op"}).
    """

    def __init__(self, change: bool):
        super().__init__()
        self.change = change
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _lowers_float64(func, args, kwargs):
            caller = _caller()
            if caller.startswith("transformers."):
                self.seen.add(f"{caller} {getattr(func, '__name__', func)}")
                if self.change:
                    if func in (torch.Tensor.to, torch.Tensor.float):
                        return args[0]
                    kwargs = {**kwargs, "dtype": torch.float64}
        return func(*args, **kwargs)


@contextmanager
def hf_float64() -> Iterator[set[str]]:
    """Inside, a float64 transformers model computes in float64 throughout.

    Yields the set of HF steps it kept in float64 (empty when the model has none).
    """
    mode = _HFFloat64(change=True)
    with mode:
        yield mode.seen


@contextmanager
def watch_float32_steps() -> Iterator[set[str]]:
    """Inside, the float32 steps HF code takes on float64 tensors are recorded, not changed.

    Entered outside :func:`hf_float64`, it sees the ops as that mode passes them on.
    """
    mode = _HFFloat64(change=False)
    with mode:
        yield mode.seen


def float32_steps(model, input_ids: torch.Tensor | None = None) -> set[str]:
    """The float32 steps of ``model``'s HF forward as it is, e.g. {"...modeling_bloom:BloomAttention.forward softmax"}.

    Runs one forward of a small batch and only watches.
    """
    if input_ids is None:
        input_ids = torch.tensor([[3, 4, 5, 6], [6, 5, 4, 3]])
    with torch.no_grad(), watch_float32_steps() as seen:
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return seen


def _moved(x: torch.Tensor, ulps: int, gen: torch.Generator) -> torch.Tensor:
    """``x`` (float32) with each element moved by a random -ulps..ulps float32 ulps."""
    k = torch.randint(-ulps, ulps + 1, x.shape, generator=gen)
    out = x.clone()
    for step in range(1, ulps + 1):
        up = torch.nextafter(out, torch.full_like(out, float("inf")))
        down = torch.nextafter(out, torch.full_like(out, float("-inf")))
        out = torch.where(k >= step, up, torch.where(k <= -step, down, out))
    return out


class _Moved(TorchFunctionMode):
    def __init__(self, ulps: int, seed: int):
        super().__init__()
        self.ulps, self.gen, self.moved = ulps, torch.Generator().manual_seed(seed), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Data-dependent steps only: activations carry the graph; tables of positions
        # (rotary angles, ALiBi) are the same at every call, on any batch.
        if (_lowers_float64(func, args, kwargs) and args[0].requires_grad
                and isinstance(out, torch.Tensor) and out.dtype == torch.float32
                and _caller().startswith("transformers.")):
            self.moved += 1
            with torch.no_grad():
                delta = _moved(out.detach(), self.ulps, self.gen) - out.detach()
            return out + delta  # the same gradient as ``out``
        return out


@contextmanager
def perturbed_float32_steps(ulps: int = 2, seed: int = 0) -> Iterator[_Moved]:
    """Emulates another machine's float32 round-off: inside, the float32 output of each
    data-dependent float32 step of HF code on a float64 model (Bloom's softmax, Llama's
    RMSNorm downcast) is moved by a random -ulps..ulps ulps, per element and per call.

    Yields the mode; its ``moved`` counts the outputs it moved.
    """
    mode = _Moved(ulps, seed)
    with mode:
        yield mode


def rtol_of(model) -> float:
    """The relative bound for two computations of ``model``'s HF forward as it is."""
    return FLOAT32_RTOL if float32_steps(model) else FLOAT64_RTOL


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, scale: float | None = None) -> None:
    """``torch.testing.assert_close`` with ``atol = rtol * scale`` (``scale`` defaults to max|want|).

    The failure message is one line: what, the max |diff|, the bound there and the tolerances.
    """
    scale = float(want.abs().max()) if scale is None else float(scale)
    atol = rtol * scale

    def msg(_: str) -> str:
        diff = (got - want).abs()
        bound = atol + rtol * want.abs()
        worst = int((diff - bound).argmax())
        return (f"{what}: max |diff| {float(diff.max()):.3e}; worst element |diff| {float(diff.flatten()[worst]):.3e} "
                f"> bound {float(bound.flatten()[worst]):.3e} (rtol {rtol:.1e}, atol {atol:.3e} = rtol x {scale:.3e})")

    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=msg)


def assert_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """Norm-wise: ``||got - want|| / ||want|| <= rtol``, one-line message with both numbers."""
    rel = float((got - want).norm() / want.norm())
    assert rel <= rtol, f"{what}: ||diff|| / ||want|| = {rel:.3e} > {rtol:.1e}"
