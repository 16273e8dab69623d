"""One model shard: a contiguous range of decoder blocks, with only its own weights loaded.

A shard of ``S`` owns blocks ``[b0, b1)``; the first also owns the input embeddings and
the last the final norm and ``lm_head``. :func:`load_shard` builds the model's skeleton on
the ``meta`` device (no storage) and reads from the safetensors checkpoint only the
tensors the shard owns, so a shard actor never holds another shard's weights.

:class:`ShardModel` runs the shard's part of the forward pass. What differs between
architectures (rotary embeddings, ALiBi, learned positions, how the attention mask is
prepared, what a block returns) lives in one small :class:`Adapter` per architecture:

    first shard:  input_ids -> embed_tokens -> begin -> blocks[b0:b1]
    other shards:                 hidden     ->        blocks[b0:b1]
    last shard:                                         ... -> end (final norm, lm_head) -> logits

Chaining the shards of a model reproduces its own ``forward(inputs_embeds=...,
attention_mask=...)`` (tests/test_shards.py checks this in float64 for every adapter).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .modules import decoder_blocks
from .passes import freeze


def split_blocks(n_blocks: int, shards: int) -> list[range]:
    """``shards`` contiguous block ranges covering ``range(n_blocks)``, sizes differing by at most one.

    Raises:
        ValueError: if there are more shards than blocks.
    """
    if shards < 1 or shards > n_blocks:
        raise ValueError(f"cannot split {n_blocks} decoder blocks into {shards} shards")
    base, extra = divmod(n_blocks, shards)
    out, start = [], 0
    for s in range(shards):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


# ------------------------------------------------------------------ adapters


def _causal_mask(model: PreTrainedModel, hidden: torch.Tensor, token_mask: torch.Tensor,
                 position_ids: torch.Tensor | None):
    from transformers.masking_utils import create_causal_mask

    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    return create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=token_mask.long(),
                              cache=None, **kwargs)


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device)[None]  # [1, T], right padding


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class Adapter:
    """What one architecture's forward does around its blocks.

    Attributes:
        model_types: the ``config.model_type`` values it serves.
        base: attribute of the causal LM holding the base model.
        embeddings: modules (under ``base``) the first shard owns besides the token embedding.
        final: modules (under ``base``) the last shard owns besides ``lm_head``.
        rotary: attribute (under ``base``) of a rotary embedding every shard rebuilds, or None.
    """

    model_types: tuple[str, ...] = ()
    base: str = ""
    embeddings: tuple[str, ...] = ()
    final: tuple[str, ...] = ()
    rotary: str | None = None

    def begin(self, model: PreTrainedModel, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """First shard: what the model does between the token embedding and block 0."""
        return inputs_embeds

    def context(self, model: PreTrainedModel, extras: dict, hidden: torch.Tensor, token_mask: torch.Tensor) -> dict:
        """Keyword arguments every block of one batch gets (mask, positions, rotary, ALiBi)."""
        raise NotImplementedError

    def block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        return _hidden(block(hidden, **ctx))

    def end(self, model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
        """Last shard: final norm and ``lm_head`` -> logits ``[B, T, V]``."""
        base = getattr(model, self.base)
        for name in self.final:
            hidden = getattr(base, name)(hidden)
        return model.get_output_embeddings()(hidden)


class RotaryAdapter(Adapter):
    """GPT-NeoX and Llama: rotary position embeddings computed once per batch, passed to blocks."""

    def context(self, model, extras, hidden, token_mask):
        pos = _positions(hidden)
        return {
            "attention_mask": _causal_mask(model, hidden, token_mask, pos),
            "position_ids": pos,
            "position_embeddings": extras["rotary"](hidden, position_ids=pos),
        }


class GPTNeoXAdapter(RotaryAdapter):
    model_types = ("gpt_neox",)
    base = "gpt_neox"
    embeddings = ("emb_dropout",)
    final = ("final_layer_norm",)
    rotary = "rotary_emb"

    def begin(self, model, inputs_embeds):
        return model.gpt_neox.emb_dropout(inputs_embeds)


class LlamaAdapter(RotaryAdapter):
    model_types = ("llama",)
    base = "model"
    final = ("norm",)
    rotary = "rotary_emb"


class GPT2Adapter(Adapter):
    """GPT-2: learned absolute positions added to the token embedding on the first shard."""

    model_types = ("gpt2",)
    base = "transformer"
    embeddings = ("wpe", "drop")
    final = ("ln_f",)

    def begin(self, model, inputs_embeds):
        t = model.transformer
        return t.drop(inputs_embeds + t.wpe(_positions(inputs_embeds)).to(inputs_embeds.dtype))

    def context(self, model, extras, hidden, token_mask):
        pos = _positions(hidden)
        return {"attention_mask": _causal_mask(model, hidden, token_mask, pos), "position_ids": pos,
                "use_cache": False}


class BloomAdapter(Adapter):
    """Bloom: a layer norm after the embedding, ALiBi biases built from the padding mask."""

    model_types = ("bloom",)
    base = "transformer"
    embeddings = ("word_embeddings_layernorm",)
    final = ("ln_f",)

    def begin(self, model, inputs_embeds):
        return model.transformer.word_embeddings_layernorm(inputs_embeds)

    def context(self, model, extras, hidden, token_mask):
        t = model.transformer
        return {
            "alibi": t.build_alibi_tensor(token_mask.long(), t.num_heads, dtype=hidden.dtype),
            "attention_mask": _causal_mask(model, hidden, token_mask, None),
            "use_cache": False,
            "output_attentions": False,
        }


ADAPTERS: dict[str, Adapter] = {t: a for a in (GPTNeoXAdapter(), LlamaAdapter(), GPT2Adapter(), BloomAdapter())
                                for t in a.model_types}


def adapter_for(model_type: str) -> Adapter:
    """The adapter of a ``config.model_type``.

    Raises:
        ValueError: for an architecture without one, naming those that have one.
    """
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(f"model shards support the architectures {sorted(ADAPTERS)}; "
                         f"this model is {model_type!r} (use cluster.shards: 1)") from None


# -------------------------------------------------------------------- shards


@dataclass
class ShardModel:
    """A model's skeleton with one shard's weights, and how to run that shard.

    Attributes:
        model: the causal LM; parameters outside the shard are ``meta`` tensors (no storage).
        adapter: its architecture's :class:`Adapter`.
        blocks: the decoder blocks this shard runs.
        first: owns the embeddings (takes ``input_ids``).
        last: owns the final norm and ``lm_head`` (returns logits).
        extras: per-shard modules rebuilt from the config (the rotary embedding).
    """

    model: PreTrainedModel
    adapter: Adapter
    blocks: range
    first: bool
    last: bool
    extras: dict

    @property
    def device(self) -> torch.device:
        return next(p for p in self.model.parameters() if not p.is_meta).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if not p.is_meta).dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """First shard: token embeddings ``[B, T, D]`` (the leaf backward stops at)."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor, embedded: bool = False) -> torch.Tensor:
        """Runs the shard's blocks (after :meth:`Adapter.begin` on the first shard).

        Args:
            hidden: ``[B, T, D]``: the token embeddings on the first shard, else the
                previous shard's output.
            token_mask: ``[B, T]`` bool, True at non-padding positions.

        Returns:
            ``[B, T, D]`` hidden states, or ``[B, T, V]`` logits on the last shard.
        """
        if self.first:
            hidden = self.adapter.begin(self.model, hidden)
        ctx = self.adapter.context(self.model, self.extras, hidden, token_mask)
        _, stack = decoder_blocks(self.model)
        for i in self.blocks:
            hidden = self.adapter.block(stack[i], hidden, ctx)
        if self.last:
            hidden = self.adapter.end(self.model, hidden)
        return hidden


def owned_prefixes(model: PreTrainedModel, adapter: Adapter, blocks: range, first: bool, last: bool) -> list[str]:
    """Module-name prefixes of everything a shard owns."""
    stack_name, _ = decoder_blocks(model)
    names = [f"{stack_name}.{i}." for i in blocks]
    inp = [n for n, m in model.named_modules() if m is model.get_input_embeddings()][0]
    out = [n for n, m in model.named_modules() if m is model.get_output_embeddings()][0]
    if first:
        names += [f"{inp}."] + [f"{adapter.base}.{e}." for e in adapter.embeddings]
    if last:
        names += [f"{out}."] + [f"{adapter.base}.{e}." for e in adapter.final]
    return names


def _checkpoint_files(path: str) -> dict[str, str]:
    """``{tensor name: file}`` of a safetensors checkpoint (single file or indexed)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            return {k: os.path.join(path, f) for k, f in json.load(fh)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: model shards load safetensors weights only "
                                "(model.safetensors or model.safetensors.index.json)")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as fh:
        return {k: single for k in fh.keys()}


def _checkpoint_name(name: str, available: dict[str, str], model: PreTrainedModel) -> str | None:
    """The checkpoint's name of model parameter ``name`` (older checkpoints drop the base prefix)."""
    prefix = model.base_model_prefix + "."
    for cand in (name, name[len(prefix):] if name.startswith(prefix) else None,
                 name.replace("lm_head.", "embed_out.", 1) if name.startswith("lm_head.") else None):
        if cand is not None and cand in available:
            return cand
    return None


def load_shard(path: str, blocks: range, first: bool, last: bool, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", trust_remote_code: bool = False) -> ShardModel:
    """A frozen :class:`ShardModel` holding only the weights of ``blocks`` (plus embeddings/head).

    Args:
        path: a local model directory with safetensors weights.
        blocks: the shard's decoder blocks.
        first, last: whether it is the first / last shard.

    Raises:
        ValueError: for an architecture without an adapter, or weights missing from the checkpoint.
    """
    from safetensors import safe_open

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    adapter = adapter_for(config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    prefixes = owned_prefixes(model, adapter, blocks, first, last)
    wanted = [n for n, _ in model.named_parameters(remove_duplicate=False) if any(n.startswith(p) for p in prefixes)]
    files = _checkpoint_files(path)
    tied_to = dict(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else {}
    state: dict[str, torch.Tensor] = {}
    handles: dict[str, Any] = {}
    try:
        for name in wanted:
            key = _checkpoint_name(name, files, model)
            if key is None and name in tied_to:
                key = _checkpoint_name(tied_to[name], files, model)
            if key is None:
                raise ValueError(f"{path}: the checkpoint holds no weight for {name!r}")
            if files[key] not in handles:
                handles[files[key]] = safe_open(files[key], framework="pt", device="cpu")
            state[name] = handles[files[key]].get_tensor(key).to(device=device, dtype=dtype)
    finally:
        handles.clear()
    model.load_state_dict(state, strict=False, assign=True)
    extras = {}
    if adapter.rotary is not None:
        rotary = getattr(getattr(model, adapter.base), adapter.rotary)
        with torch.device(device):
            extras["rotary"] = type(rotary)(config=model.config)
    return ShardModel(freeze(model), adapter, blocks, first, last, extras)


def model_blocks(path: str, trust_remote_code: bool = False) -> int:
    """Decoder blocks of the model at ``path`` (any fsspec URL), from its ``config.json`` alone."""
    import fsspec

    with fsspec.open(path.rstrip("/") + "/config.json") as fh:
        data = json.load(fh)
    if "model_type" not in data:
        raise ValueError(f"{path}/config.json names no model_type")
    return int(AutoConfig.for_model(data.pop("model_type"), **data).num_hidden_layers)


def shard_layout(n_blocks: int, shards: int) -> list[tuple[range, bool, bool]]:
    """``(blocks, first, last)`` of each shard."""
    ranges = split_blocks(n_blocks, shards)
    return [(r, i == 0, i == shards - 1) for i, r in enumerate(ranges)]


def chain(shards: Sequence[ShardModel], input_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the whole model from its shards in one process (tests, debugging)."""
    hidden = shards[0].embed(input_ids)
    for s in shards:
        hidden = s.forward(hidden.to(s.device), token_mask.to(s.device))
    return hidden
