"""Which modules are tracked: the linear maps inside the decoder blocks.

A tracked module is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's linear layer,
whose weight is stored transposed as ``[d_in, d_out]``) that lives inside one of the
model's decoder blocks, and whose full name matches an ``include`` glob and no
``exclude`` glob. Embeddings and ``lm_head`` live outside the blocks, and the default
excludes name them as well.

Every weight is seen in one canonical layout, ``W`` of shape ``[d_out, d_in]``; a module
with a bias appends a column, so the per-document gradient is ``[d_out, d_in']`` with
``d_in' = d_in + 1`` (see :mod:`ray_influence.ekfac`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

try:  # transformers >= 4.x keeps GPT-2's Conv1D here.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

DEFAULT_INCLUDE: tuple[str, ...] = ("*",)
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*embed*")


@dataclass(frozen=True)
class ModuleSpec:
    """Shape facts of one tracked module.

    Attributes:
        name: full dotted name in the model (``model.named_modules()``).
        block: index of the decoder block that holds it.
        d_in: input features (without the bias column).
        d_out: output features.
        bias: whether the module adds a bias (then ``d_in' = d_in + 1``).
        transposed: True for ``Conv1D``, whose weight is stored ``[d_in, d_out]``.
    """

    name: str
    block: int
    d_in: int
    d_out: int
    bias: bool
    transposed: bool

    @property
    def d_in_aug(self) -> int:
        """``d_in'``: input features plus the bias column when there is a bias."""
        return self.d_in + int(self.bias)

    @property
    def shape(self) -> tuple[int, int]:
        """Canonical gradient shape ``(d_out, d_in')``."""
        return (self.d_out, self.d_in_aug)

    def weight_grad_to_canonical(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
        """Maps autograd's ``weight.grad`` (and ``bias.grad``) to ``[d_out, d_in']``."""
        w = weight_grad.T if self.transposed else weight_grad
        if self.bias:
            assert bias_grad is not None, f"{self.name} has a bias but no bias gradient was given"
            w = torch.cat([w, bias_grad[:, None]], dim=1)
        return w


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Finds the model's stack of decoder blocks.

    The stack is the ``nn.ModuleList`` holding the most parameters (``gpt_neox.layers``,
    ``model.layers``, ``transformer.h`` ...), which holds for every decoder-only
    transformer in transformers.

    Returns:
        The stack's dotted name and the ``ModuleList`` itself.

    Raises:
        ValueError: if the model has no ``ModuleList`` of blocks.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n_params = sum(p.numel() for p in module.parameters())
            if best is None or n_params > best[0]:
                best = (n_params, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder blocks")
    return best[1], best[2]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # A pattern matches the full name or any dotted suffix of it, so "lm_head" and
    # "*.mlp.*" both read the way a user means them.
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def find_tracked_modules(
    model: nn.Module,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    blocks: range | None = None,
) -> dict[str, ModuleSpec]:
    """Lists the tracked modules of ``model``, in model order.

    Args:
        model: a decoder-only transformers model (or any model with a block stack).
        include: glob patterns; a module is tracked when one of them matches its name.
        exclude: glob patterns; a matching module is never tracked.
        blocks: only modules of these block indices (a model shard's range); all when None.

    Returns:
        ``{name: ModuleSpec}`` for every tracked module.

    Raises:
        ValueError: if the selection is empty, naming the patterns.
    """
    stack_name, stack = decoder_blocks(model)
    specs: dict[str, ModuleSpec] = {}
    for block_idx, block in enumerate(stack):
        if blocks is not None and block_idx not in blocks:
            continue
        for sub_name, module in block.named_modules():
            name = f"{stack_name}.{block_idx}.{sub_name}" if stack_name else f"{block_idx}.{sub_name}"
            if not sub_name or not _matches(name, include) or _matches(name, exclude):
                continue
            if isinstance(module, nn.Linear):
                d_out, d_in = module.weight.shape
                transposed = False
            elif Conv1D and isinstance(module, Conv1D):
                d_in, d_out = module.weight.shape
                transposed = True
            else:
                continue
            specs[name] = ModuleSpec(
                name=name,
                block=block_idx,
                d_in=int(d_in),
                d_out=int(d_out),
                bias=module.bias is not None,
                transposed=transposed,
            )
    if not specs:
        raise ValueError(
            f"no tracked module matches include={list(include)!r} exclude={list(exclude)!r} "
            f"in the decoder blocks {stack_name!r} of {type(model).__name__}"
        )
    return specs
