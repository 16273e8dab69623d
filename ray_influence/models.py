"""Loading models and tokenizers through ``from_pretrained``, with safe defaults.

``trust_remote_code`` is off and only safetensors weights load unless the caller opts in
(DESIGN.md §5). Parameters come back frozen, in eval mode.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .passes import freeze

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {tuple(DTYPES)}") from None


def load_model(
    path: str,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """A frozen causal LM from a model directory (local path or URL transformers accepts)."""
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=parse_dtype(dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )
    return freeze(model.to(device))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer saved beside the model."""
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
