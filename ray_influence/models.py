"""Loading models and tokenizers through ``from_pretrained``, with safe defaults.

A model directory may be a local path or any fsspec URL (copied to a local cache first).

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


def local_model_dir(path: str) -> str:
    """``path`` itself when local; otherwise a copy of the remote directory in a local cache.

    transformers' ``from_pretrained`` reads local directories; a model directory given as an
    fsspec URL (``s3://...``) is copied once to ``$RAY_INFLUENCE_CACHE`` (default
    ``~/.cache/ray-influence``), keyed by the URL, and loaded from there.
    """
    import hashlib
    import os

    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return root
    cache = os.environ.get("RAY_INFLUENCE_CACHE", os.path.expanduser("~/.cache/ray-influence"))
    target = os.path.join(cache, "models", hashlib.sha256(path.encode()).hexdigest()[:16])
    done = os.path.join(target, ".complete")
    if not os.path.exists(done):
        tmp = f"{target}.tmp-{os.getpid()}"
        fs.get(root.rstrip("/") + "/", tmp, recursive=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            import shutil

            shutil.rmtree(target)
        os.replace(tmp, target)
        open(done, "w").close()
    return target


def load_model(
    path: str,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """A frozen causal LM from a model directory (local path or URL transformers accepts)."""
    model = AutoModelForCausalLM.from_pretrained(
        local_model_dir(path),
        dtype=parse_dtype(dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )
    return freeze(model.to(device))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer saved beside the model."""
    return AutoTokenizer.from_pretrained(local_model_dir(path), trust_remote_code=trust_remote_code)


def load_model_shard(
    path: str,
    blocks: range,
    first: bool,
    last: bool,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
):
    """One shard of a model (:func:`ray_influence.shard_model.load_shard`): only its own weights.

    Shards read safetensors checkpoints only (``model.allow_pickle`` does not apply).
    """
    from .shard_model import load_shard

    return load_shard(local_model_dir(path), blocks, first, last, parse_dtype(dtype), device, trust_remote_code)
