"""Capture of module inputs and output-gradients with hooks, removed in ``finally``.

A forward hook on each tracked module converts its input into the package layout
``a: [B, T, d_in']`` (:func:`to_layout`), hands it to ``keep_input`` (which may project or
rotate it, so only what is needed is kept), and registers a tensor hook on the module's
output. During backward that tensor hook receives ``g: [B, T, d_out]``, masks it, and
calls ``on_grad(name, kept, g)``. Nothing is stored on the model; the hooks and the kept
inputs live in the context manager's closure and are dropped when it exits.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .ekfac import aligned_empty
from .modules import ModuleSpec

KeepInput = Callable[[str, torch.Tensor], torch.Tensor]
OnGrad = Callable[[str, torch.Tensor, torch.Tensor], None]


def to_layout(x: torch.Tensor, token_mask: torch.Tensor, bias: bool) -> torch.Tensor:
    """Module input ``[B, T, d_in]`` -> masked activations ``[B, T, d_in']``.

    Args:
        x: the module's input.
        token_mask: ``[B, T]`` bool, True at non-padding positions.
        bias: append the column of ones that stands for the bias.
    """
    m = token_mask.to(x.dtype)[..., None]  # [B, T, 1]
    if not bias:
        return x * m
    # One write of the result (no concatenated copy), into rows aligned for the BLAS.
    out = aligned_empty((*x.shape[:-1], x.shape[-1] + 1), x.dtype, x.device)
    torch.mul(x, m, out=out[..., :-1])
    out[..., -1:] = m
    return out


@contextmanager
def capture(
    model: nn.Module,
    specs: Mapping[str, ModuleSpec],
    token_mask: torch.Tensor,
    on_grad: OnGrad,
    keep_input: KeepInput | None = None,
) -> Iterator[None]:
    """Hooks ``specs``' modules of ``model`` for one forward and any number of backwards.

    Args:
        model: the model; its parameters are not touched.
        specs: tracked modules by name (:func:`ray_influence.modules.find_tracked_modules`).
        token_mask: ``[B, T]`` bool mask of non-padding positions of this batch.
        on_grad: called as ``on_grad(name, kept_input, g)`` with ``g: [B, T, d_out]``
            (zero at padding) on every backward pass through the module.
        keep_input: maps ``(name, a)`` to what ``on_grad`` receives as ``kept_input``;
            identity when None.

    Raises:
        RuntimeError: if a tracked module runs twice in one forward (weight sharing),
            which this layout does not represent.
    """
    modules = dict(model.named_modules())
    missing = [n for n in specs if n not in modules]
    if missing:
        raise ValueError(f"tracked modules not found in the model: {missing}")
    seen: set[str] = set()

    def forward_hook(name: str, spec: ModuleSpec, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if name in seen:
            raise RuntimeError(f"module {name!r} ran twice in one forward; shared weights are not supported")
        seen.add(name)
        # Detached: what collectors keep must not hold the autograd graph alive.
        a = to_layout(inputs[0].detach(), token_mask, spec.bias)
        kept = keep_input(name, a) if keep_input is not None else a
        if not output.requires_grad:
            raise RuntimeError(f"output of {name!r} does not require grad; run the forward under torch.enable_grad()")
        mask = token_mask.to(output.dtype)[..., None]

        def grad_hook(g: torch.Tensor) -> None:
            on_grad(name, kept, g * mask)

        output.register_hook(grad_hook)

    handles = []
    try:
        for name, spec in specs.items():
            hook = functools.partial(forward_hook, name, spec)
            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
