"""Tokenisation of documents, fine-tuning examples and queries, and padded batches.

DESIGN.md §2 fixes the tokens so anyone can reproduce a score:

- corpus document: ``tokenizer(text)`` + EOS, truncated to ``max_length``; the loss covers
  every predicted token (positions 1..T-1);
- fine-tuning example: ``tokenizer(prompt)`` + ``tokenizer(completion, no special tokens)``
  + EOS; the loss covers the completion and the EOS;
- query: the same without the EOS; the loss covers exactly the completion.

``Example.loss_mask[t]`` says whether token ``t`` is a loss target (predicted from the
tokens before it); ``loss_mask[0]`` is always False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Example:
    """One tokenised sequence.

    Attributes:
        key: stable identity (the doc or query id as a string); seeds label sampling.
        input_ids: token ids, length T.
        loss_mask: length T; True where the token is a loss target.
        truncated: whether tokens were cut to fit ``max_length``.
    """

    key: str
    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of a list of examples.

    Attributes:
        keys: one per row.
        input_ids: ``[B, T]`` long.
        token_mask: ``[B, T]`` bool, True at non-padding positions.
        loss_mask: ``[B, T]`` bool, True at loss targets.
    """

    keys: tuple[str, ...]
    input_ids: torch.Tensor
    token_mask: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.keys, self.input_ids.to(device), self.token_mask.to(device), self.loss_mask.to(device))

    @property
    def n_tokens(self) -> int:
        return int(self.token_mask.sum())


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; documents are EOS-separated")
    return int(tokenizer.eos_token_id)


def tokenize_document(tokenizer, key: str, text: str, max_length: int) -> Example:
    """A corpus document: ``tokenizer(text)`` + EOS, truncated to ``max_length``."""
    ids = list(tokenizer(text)["input_ids"]) + [_eos(tokenizer)]
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    return Example(key, tuple(ids), tuple(t > 0 for t in range(len(ids))), truncated)


def tokenize_prompt_completion(
    tokenizer, key: str, prompt: str, completion: str, max_length: int, add_eos: bool
) -> Example:
    """A fine-tuning example (``add_eos=True``) or a query (``add_eos=False``).

    The prompt is cut from the left when the pair is too long, so the completion (the
    part the loss covers) survives; a completion alone longer than ``max_length - 1`` is
    cut at its end.

    Raises:
        ValueError: if the completion tokenises to nothing.
    """
    comp = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not comp:
        raise ValueError(f"{key!r}: empty completion {completion!r}; the loss would cover no token")
    if add_eos:
        comp.append(_eos(tokenizer))
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        # The first completion token needs a token before it to be predicted from.
        prompt_ids = [_eos(tokenizer)]
    truncated = len(prompt_ids) + len(comp) > max_length
    if truncated:
        comp = comp[: max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(comp)) :]
    ids = prompt_ids + comp
    mask = [False] * len(prompt_ids) + [True] * len(comp)
    return Example(key, tuple(ids), tuple(mask), truncated)


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-pads ``examples`` into a :class:`Batch`; padding is masked everywhere."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    token_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        token_mask[row, :n] = True
        loss_mask[row, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
    return Batch(tuple(e.key for e in examples), ids, token_mask, loss_mask)


def batches(examples: Sequence[Example], max_tokens: int, max_docs: int | None = None) -> list[list[Example]]:
    """Groups examples, in order, into batches of at most ``max_tokens`` padded tokens.

    Order is kept (so results do not depend on it); an example longer than the budget
    forms its own batch.
    """
    out: list[list[Example]] = []
    cur: list[Example] = []
    width = 0
    for e in examples:
        new_width = max(width, len(e))
        if cur and (new_width * (len(cur) + 1) > max_tokens or (max_docs and len(cur) >= max_docs)):
            out.append(cur)
            cur, new_width = [], len(e)
        cur.append(e)
        width = new_width
    if cur:
        out.append(cur)
    return out
