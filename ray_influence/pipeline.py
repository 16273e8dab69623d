"""Pipeline-parallel passes over the shards of one replica (DESIGN.md §3, model shards).

A replica of ``S`` shards runs every pass of :mod:`ray_influence.passes` split by blocks.
Each shard holds a :class:`ShardSession`: its model part, its tracked modules and its own
collector, so each shard captures and keeps the statistics of its own modules only.

For one micro-batch ``b``:

    forward   shard 0: ids -> x_0 = embed (leaf) -> h_0 ; shard s: h_{s-1} -> h_s ;
              shard S-1: h_{S-2} -> logits -> losses -> backward to its input
    backward  shard s: d h_s (one per label sample) -> d h_{s-1} ; shard 0: down to x_0

Hidden states go forward and output-gradients go back through the object store. The
first shard (the replica's head) drives the loop (:func:`pipelined_batches`): it submits
the forwards of a window of micro-batches before their backwards, so the shards work on
different micro-batches at once. Every shard sees the batches' backwards in the same
order, so their collectors' rows line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .modules import ModuleSpec
from .passes import Collector, Labels, forward_step, run_with_rerun
from .shard_model import ShardModel
from .tokens import Batch, Example, batches, collate


class ShardLost(RuntimeError):
    """A shard of the replica died (or restarted and lost its pass): the task is retried."""


@dataclass
class Step:
    """What travels back through the shards for one micro-batch.

    Attributes:
        losses: ``[B]`` float64 data losses; NaN rows had a non-finite forward.
        grads: ``[samples, B, T, D]`` gradient of each sample's loss w.r.t. the receiving
            shard's output; None when no backward runs (a non-finite forward) or past shard 0.
    """

    losses: torch.Tensor
    grads: torch.Tensor | None

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.losses).all())


class ShardSession:
    """One pass of one shard: forward and backward of micro-batches into its collector.

    Args:
        shard: the shard's model part.
        specs: the shard's tracked modules.
        collector: receives the shard's captured inputs and output-gradients.
        labels, seed, pass_name: label choice of the loss (used by the last shard).
        on_batch: called with each batch whose backward reached the collector.
    """

    def __init__(self, shard: ShardModel, specs: dict[str, ModuleSpec], collector: Collector,
                 labels: Labels = Labels.DATA, seed: int = 0, pass_name: str = "",
                 on_batch: Callable[[Batch], None] | None = None):
        self.shard = shard
        self.specs = specs
        self.collector = collector
        self.labels = labels
        self.seed = seed
        self.pass_name = pass_name
        self.on_batch = on_batch
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, Batch]] = {}

    def forward(self, bid: int, batch: Batch, hidden: torch.Tensor | None) -> torch.Tensor | Step:
        """Runs micro-batch ``bid`` through the shard's blocks.

        Returns:
            The detached output ``[B, T, D]`` for the next shard; on the last shard the
            :class:`Step` of its backward (the loss and sampling happen here).
        """
        sh = self.shard
        batch = batch.to(sh.device)
        if sh.first:
            x = sh.embed(batch.input_ids).detach().requires_grad_(True)
        else:
            x = hidden.to(sh.device).detach().requires_grad_(True)
        out, data_loss, backward = forward_step(
            sh.model, self.specs, batch, self.collector, lambda: sh.forward(x, batch.token_mask),
            self.labels if sh.last else None, self.seed, self.pass_name)
        if not sh.last:
            self._pending[bid] = (x, out, batch)
            return out.detach().cpu()  # through the object store; the next shard moves it to its device
        if backward is None:
            return Step(data_loss, None)
        with torch.enable_grad():
            grads = backward(x)
        self._done(batch)
        return Step(data_loss, torch.stack(grads).detach().cpu())

    def backward(self, bid: int, step: Step) -> Step:
        """Back-propagates ``step``'s output-gradients through micro-batch ``bid``'s graph."""
        x, out, batch = self._pending.pop(bid)
        if step.grads is None:
            return step  # non-finite forward: the graph is dropped, nothing is collected
        grads = step.grads.to(out.device)
        with torch.enable_grad():
            back = [torch.autograd.grad(out, x, grad_outputs=g, retain_graph=s < len(grads) - 1)[0]
                    for s, g in enumerate(grads)]
        self._done(batch)
        return Step(step.losses, None if self.shard.first else torch.stack(back).detach().cpu())

    def _done(self, batch: Batch) -> None:
        if self.on_batch is not None:
            self.on_batch(batch)


def pipelined_batches(
    head: ShardSession,
    peers: Sequence,
    sid: str,
    examples: Sequence[Example],
    max_tokens: int,
    window: int | None = None,
) -> tuple[list[str], torch.Tensor, list[str]]:
    """The sharded :func:`ray_influence.attribution.run_batches`, driven by the first shard.

    Args:
        head: the first shard's session (in this process).
        peers: actor handles of shards 1..S-1 in order; each has the session ``sid`` open
            and serves ``shard_forward(sid, bid, batch, hidden)`` and ``shard_backward(sid, bid, step)``.
        examples: sorted by length here, then grouped into micro-batches of ``max_tokens``.
        window: micro-batches in flight at once (default: 2 per shard).

    Returns:
        ``(kept keys in collector order, their data losses [N], skipped keys)``.
    """
    import ray

    window = window or 2 * (len(peers) + 1)
    next_bid = 0

    def run(groups: Sequence[list[Example]]):
        nonlocal next_bid
        for w0 in range(0, len(groups), window):
            flights = []
            for group in groups[w0:w0 + window]:
                batch = collate(group)
                bid, next_bid = next_bid, next_bid + 1
                ref = head.forward(bid, batch, None)
                for peer in peers:
                    ref = peer.shard_forward.remote(sid, bid, batch, ref)
                flights.append((bid, group, ref))
            backs = []
            for bid, group, ref in flights:
                for peer in reversed(peers[:-1]):
                    ref = peer.shard_backward.remote(sid, bid, ref)
                backs.append((bid, group, ref))
            for bid, group, ref in backs:
                yield group, head.backward(bid, ray.get(ref)).losses

    # One window of all the groups: the pipeline windows them itself; non-finite rows rerun at the end.
    return run_with_rerun(batches(sorted(examples, key=len), max_tokens), run)
