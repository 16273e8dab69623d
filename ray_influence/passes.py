"""One forward and one or more activation-only backward passes over a batch.

The model's parameters are frozen (``requires_grad=False``) and backward is asked only
for the gradient of the input embeddings, so autograd computes activation gradients and
never a weight gradient. Tracked modules' inputs and output-gradients go to a
*collector* (:mod:`ray_influence.collectors`) through :func:`ray_influence.capture.capture`.

Loss of a row: ``L = sum_t -log p(y_t | x_<t)`` over its loss targets (a sum, never a
mean). ``y`` are the data's tokens (``Labels.DATA``: index, query and empirical-Fisher
passes) or are sampled from the model's predictive distribution (``Labels.SAMPLED``: the
true Fisher), ``samples`` draws per position, each its own backward. Sampling is seeded
per row from ``(seed, pass name, row key, sample)``, so it does not depend on batching,
workers or retries.
"""

from __future__ import annotations

import enum
from typing import Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from .capture import capture
from .modules import ModuleSpec
from .projection import stable_seed
from .tokens import Batch, Example


class Labels(str, enum.Enum):
    DATA = "data"
    SAMPLED = "sampled"


class Collector(Protocol):
    """Receives the captured tensors of one pass (see :mod:`ray_influence.collectors`)."""

    samples: int

    def keep_input(self, name: str, a: torch.Tensor): ...

    def on_grad(self, name: str, kept, g: torch.Tensor) -> None: ...


def freeze(model: nn.Module) -> nn.Module:
    """Puts ``model`` in eval mode with every parameter frozen; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def _finite_positions(logits: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: whether every logit at a position is finite.

    A finite sum over the vocabulary means every term is finite (inf and NaN propagate),
    which one fast reduction settles for almost every position; only positions whose sum
    is not finite (a non-finite logit, or an overflowing sum) are checked term by term.
    """
    finite = torch.isfinite(logits.sum(-1))  # [B, T]
    if not bool(finite.all()):
        finite = torch.isfinite(logits).all(-1)
    return finite


def _label_uniforms(batch: Batch, seed: int, pass_name: str, samples: int) -> torch.Tensor:
    """``u ~ U[0, 1)``, ``[B, T-1, S]`` float64 on the CPU (0 at positions not in the loss).

    Row ``b`` draws ``[n_b, S]`` numbers (``n_b`` its loss positions, in order) from its own
    CPU generator, seeded from ``(seed, pass name, row key)``: they depend neither on the
    batch the row is in nor on the device.
    """
    targets_mask = batch.loss_mask[:, 1:].cpu()
    u = torch.zeros((*targets_mask.shape, samples), dtype=torch.float64)
    for row, key in enumerate(batch.keys):
        pos = targets_mask[row].nonzero(as_tuple=True)[0]
        if len(pos) == 0:
            continue
        gen = torch.Generator().manual_seed(stable_seed("labels", seed, pass_name, key))
        u[row, pos] = torch.rand((len(pos), samples), generator=gen, dtype=torch.float64)
    return u


def _sample_targets(probs: torch.Tensor, batch: Batch, seed: int, pass_name: str, samples: int) -> torch.Tensor:
    """Labels drawn from the model, ``[S, B, T-1]`` (positions not in the loss are 0).

    Inverse-CDF sampling of the whole batch at once: with ``c`` the cumulative
    probabilities of a position normalised to end at 1, draw ``y = min{v : c_v >= u}`` for
    each of its uniforms (:func:`_label_uniforms`). This is the rule of CPU
    ``torch.multinomial(p, S, replacement=True)`` for ``S > 1`` with the same uniforms in
    the same order, so for several samples and float64 probabilities the labels are the
    ones a per-row multinomial drew (tests/test_passes.py); one ``[B, T-1, V]`` scan
    replaces a multinomial per row (and, for ``S = 1``, the V exponential variates per
    position that torch draws then).

    Args:
        probs: ``[B, T-1, V]`` the model's probabilities of positions 1..T-1.
    """
    targets_mask = batch.loss_mask[:, 1:]
    cdf = probs.cumsum(-1)  # [B, T-1, V]
    cdf.div_(cdf[..., -1:].clone())
    cdf[..., -1] = 1  # the last bucket ends at exactly 1, whatever the round-off
    u = _label_uniforms(batch, seed, pass_name, samples).to(device=probs.device, dtype=cdf.dtype)  # [B, T-1, S]
    drawn = torch.searchsorted(cdf, u)  # [B, T-1, S]: first v with cdf_v >= u
    return torch.where(targets_mask[..., None], drawn, 0).permute(2, 0, 1)


def run_pass(
    model: nn.Module,
    batch: Batch,
    specs: dict[str, ModuleSpec],
    collector: Collector,
    labels: Labels = Labels.DATA,
    seed: int = 0,
    pass_name: str = "",
) -> torch.Tensor:
    """Runs the forward and ``collector.samples`` backward passes of one batch.

    Args:
        model: a frozen causal LM (:func:`freeze`); its device and dtype are used.
        batch: the padded batch (moved to the model's device here).
        specs: the tracked modules.
        collector: gets every tracked module's inputs and output-gradients.
        labels: data labels or labels sampled from the model.
        seed: base seed of label sampling.
        pass_name: separates the label streams of different passes.

    Returns:
        ``[B]`` float64 per-row losses with the data's labels. When any row's logits or
        loss are not finite, no backward runs at all (so nothing reaches the collector)
        and those rows' losses are NaN: the caller reruns the batch without them
        (:func:`ray_influence.attribution.run_batches`).

    Raises:
        ValueError: if a parameter requires grad (weight gradients would be computed).
    """
    check_frozen(model)
    if labels is Labels.DATA and collector.samples != 1:
        raise ValueError(f"data labels give one gradient per row; got samples={collector.samples}")
    param = next(model.parameters())
    batch = batch.to(param.device)
    inputs_embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
    _, data_loss, backward = forward_step(
        model, specs, batch, collector,
        lambda: model(inputs_embeds=inputs_embeds, attention_mask=batch.token_mask.long()).logits,
        labels, seed, pass_name)
    if backward is not None:
        with torch.enable_grad():
            backward(inputs_embeds)
    return data_loss


def check_frozen(model: nn.Module) -> None:
    """Raises ValueError if a parameter of ``model`` requires grad (backward would compute weight gradients)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"parameters {trainable[:3]} require grad; freeze the model first "
            "(ray_influence.passes.freeze) so backward computes no weight gradient"
        )


def forward_step(
    model: nn.Module,
    specs: dict[str, ModuleSpec],
    batch: Batch,
    collector: Collector,
    forward: Callable[[], torch.Tensor],
    labels: Labels | None = None,
    seed: int = 0,
    pass_name: str = "",
) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], list[torch.Tensor]] | None]:
    """The forward of one batch with capture, and its loss: shared by :func:`run_pass` and the
    pipelined shards (:class:`ray_influence.pipeline.ShardSession`).

    Args:
        model: the frozen module whose tracked modules ``specs`` are hooked (checked here).
        batch: the batch, on the model's device.
        forward: runs the forward from a leaf input the caller made; returns its output,
            ``[B, T, V]`` logits when a loss follows, else ``[B, T, D]`` hidden states.
        labels: None when no loss is taken here (a shard before the last).

    Returns:
        ``(output, data losses [B] float64 or None, backward or None)``: the last two are
        :func:`loss_terms`' (None without ``labels``).
    """
    check_frozen(model)
    with torch.enable_grad():
        with capture(model, specs, batch.token_mask, collector.on_grad, collector.keep_input):
            out = forward()
        if labels is None:
            return out, None, None
        data_loss, backward = loss_terms(out, batch, labels, seed, pass_name, collector.samples)
    return out, data_loss, backward


RunGroups = Callable[[Sequence[list[Example]]], Iterable[tuple[list[Example], torch.Tensor]]]
"""Runs micro-batches (groups of examples) into a collector; yields ``(group, data losses [B])``
per group, in order; a group with a NaN loss reached no collector."""


def run_with_rerun(groups: Sequence[list[Example]], run: RunGroups, window: int | None = None,
                   ) -> tuple[list[str], torch.Tensor, list[str]]:
    """The skip-and-rerun loop of non-finite rows, for one process and for pipelined shards.

    Groups run ``window`` at a time (None: all at once); after each window, every group
    that held a row with a non-finite loss (and so reached no collector) is rerun without
    those rows, which are returned as skipped.

    Returns:
        ``(kept keys in collector order, their data losses [N] float64, skipped keys)``.
    """
    kept: list[str] = []
    losses: list[torch.Tensor] = []
    skipped: list[str] = []
    window = window or max(len(groups), 1)
    for w0 in range(0, len(groups), window):
        rerun = []
        for group, loss in run(groups[w0:w0 + window]):
            bad = (~torch.isfinite(loss)).tolist()
            if not any(bad):
                kept += [e.key for e in group]
                losses.append(loss)
                continue
            skipped += [e.key for e, b in zip(group, bad) if b]
            if not all(bad):
                rerun.append([e for e, b in zip(group, bad) if not b])
        for group, loss in run(rerun) if rerun else ():
            # Rows that were finite in a batch stay finite alone (rows do not interact).
            assert bool(torch.isfinite(loss).all()), "a row became non-finite once its batch shrank"
            kept += [e.key for e in group]
            losses.append(loss)
    return kept, (torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)), skipped


def loss_terms(
    logits: torch.Tensor, batch: Batch, labels: Labels, seed: int, pass_name: str, samples: int
) -> tuple[torch.Tensor, Callable[[torch.Tensor], list[torch.Tensor]] | None]:
    """The data loss of one batch's logits per row, and the backward of each label sample's loss.

    The gradient of a sample's summed loss with respect to the logits is written down
    rather than back-propagated through the log-softmax: at a loss position t with
    weight ``w_t`` and label ``y_t`` it is ``w_t (p_t - e_{y_t})`` (``p_t`` the softmax), and
    0 elsewhere. The softmax is computed once and serves the data loss, the label
    sampling and every sample's gradient, and no ``[B, T, V]`` gradient buffers of
    autograd's log-softmax, gather and slice backwards are filled.

    Args:
        logits: ``[B, T, V]``, still attached to the graph.
        batch: the batch (on the logits' device).

    Returns:
        ``(data losses [B] float64 on the CPU, backward or None)``. ``backward(x)`` runs
        one backward per label sample from the logits to ``x`` and returns the gradients
        ``[d L_s / d x for each sample]``; it can run once. None when a row's logits or loss are not finite;
        those rows' data losses are NaN then, and no backward must run.
    """
    # Half-precision logits are upcast for the softmax; float64 stays float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    z = logits.detach()[:, :-1]  # [B, T-1, V] predicting positions 1..T-1
    # The softmax goes into the first T-1 positions of a [B, T, V] buffer, which then
    # becomes the last sample's logits gradient in place (one buffer fewer).
    buf = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    probs = buf[:, :-1]  # [B, T-1, V]
    top = z.amax(dim=-1, keepdim=True)  # [B, T-1, 1]
    torch.sub(z, top, out=probs).exp_()
    total = probs.sum(dim=-1, keepdim=True)  # [B, T-1, 1]
    probs.div_(total)
    lse = top + total.log()
    weights = batch.loss_mask[:, 1:].to(z.dtype)  # [B, T-1]
    logp_data = z.gather(-1, batch.input_ids[:, 1:, None]) - lse  # [B, T-1, 1]
    data_loss = -(logp_data.squeeze(-1) * weights).sum(-1)
    finite = torch.isfinite(data_loss) & (_finite_positions(logits.detach()) | ~batch.token_mask).all(-1)
    if not bool(finite.all()):
        return torch.where(finite, data_loss, torch.nan).to(torch.float64).cpu(), None
    if labels is Labels.DATA:
        targets = [batch.input_ids[:, 1:]]
    else:
        targets = list(_sample_targets(probs, batch, seed, pass_name, samples))
    w = weights[..., None]  # [B, T-1, 1]
    ran = []

    def backward(x: torch.Tensor) -> list[torch.Tensor]:
        if ran:  # the last sample's gradient overwrote the probabilities
            raise RuntimeError("loss_terms' backward runs once")
        ran.append(True)
        out = []
        for s, y in enumerate(targets):
            last = s == len(targets) - 1
            dz = buf if last else torch.empty_like(buf)  # [B, T, V]: d L_s / d logits
            dz[:, -1] = 0  # the last position predicts nothing
            torch.mul(probs, w, out=dz[:, :-1])  # in place on the last sample
            dz[:, :-1].scatter_add_(-1, y[..., None], -w)
            out.append(torch.autograd.grad(logits, x, grad_outputs=dz, retain_graph=not last)[0])
        return out

    return data_loss.to(torch.float64).cpu(), backward
