"""Tiny models and a word-level tokenizer built from configs, for tests and the demo.

Nothing is downloaded: models are random-initialised from transformers configs and the
tokenizer is a word-level vocabulary built from the text it will see. Saved with
``save_pretrained``, they load back through the same ``from_pretrained`` code as real
checkpoints.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")


def word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over every word in ``texts``.

    Token ids: ``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2, then words in sorted order, so the
    same texts always give the same vocabulary.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )


def bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2 style: a space is part of the next token).

    Token ids: ``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2, the 256 byte symbols, then up to
    ``vocab_size - 259`` merges learned from the texts in the order given, so the same texts
    always give the same vocabulary. Rare words (the world's made-up names) come out as
    several tokens, frequent ones as one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )


def _gpt_neox(vocab: int, hidden: int, layers: int, heads: int, positions: int) -> PreTrainedModel:
    cfg = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=positions, rotary_pct=0.5,
        bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(cfg)


def _llama(vocab: int, hidden: int, layers: int, heads: int, positions: int) -> PreTrainedModel:
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),  # grouped-query attention
        intermediate_size=2 * hidden, max_position_embeddings=positions,
        bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _gpt2(vocab: int, hidden: int, layers: int, heads: int, positions: int) -> PreTrainedModel:
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
        bos_token_id=2, eos_token_id=2, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def _bloom(vocab: int, hidden: int, layers: int, heads: int, positions: int) -> PreTrainedModel:
    cfg = BloomConfig(
        vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads,
        bos_token_id=2, eos_token_id=2, pad_token_id=0,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    return BloomForCausalLM(cfg)


ARCHITECTURES: dict[str, Callable[..., PreTrainedModel]] = {
    "gpt_neox": _gpt_neox,
    "llama": _llama,
    "gpt2": _gpt2,
    "bloom": _bloom,
}


def tiny_model(
    arch: str,
    vocab_size: int,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 4,
    positions: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A random-initialised decoder of architecture ``arch`` (one of :data:`ARCHITECTURES`).

    Raises:
        ValueError: for an unknown architecture, naming the known ones.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {tuple(ARCHITECTURES)}")
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch](vocab_size, hidden, layers, heads, positions)
    return model.to(dtype).eval()


def perturbed_copy(model: PreTrainedModel, scale: float = 0.05, seed: int = 1) -> PreTrainedModel:
    """A copy of ``model`` with every parameter moved by relative Gaussian noise (a toy "fine-tune")."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.add_(scale * p.detach().abs().mean() * noise)
    return out



def save_toy_pair(root, model: PreTrainedModel, tokenizer, scale: float = 0.05) -> None:
    """Saves ``model`` as ``root/pt`` and a :func:`perturbed_copy` as ``root/ft``, each with the tokenizer."""
    from pathlib import Path

    for name, m in (("pt", model), ("ft", perturbed_copy(model, scale))):
        m.save_pretrained(Path(root) / name)
        tokenizer.save_pretrained(Path(root) / name)


def word_text(rng, words: Sequence[str], min_words: int, max_words: int) -> str:
    """A random text of ``min_words``..``max_words`` words drawn from ``words`` (benchmarks)."""
    return " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
