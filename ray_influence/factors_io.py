"""EK-FAC factors on disk: one safetensors file per stage (and shard), JSON metadata inside.

Tensors are stored as ``{module}/q_a``, ``{module}/q_g`` and ``{module}/lam``; the header's
metadata holds one JSON document under ``ray_influence`` with, per module, its shape,
damping, token and document counts, plus the stage-wide fisher type, dtype and anything
the caller adds. Files are read and written through fsspec, so ``run_dir`` can be any URL.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Mapping

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .ekfac import ModuleFactors

FORMAT_VERSION = 1
_META_KEY = "ray_influence"


def factors_to_bytes(factors: Mapping[str, ModuleFactors], meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialises factors (float64, contiguous) with their metadata."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, f in factors.items():
        tensors[f"{name}/q_a"] = f.q_a.detach().to(torch.float64).contiguous().cpu()
        tensors[f"{name}/q_g"] = f.q_g.detach().to(torch.float64).contiguous().cpu()
        tensors[f"{name}/lam"] = f.lam.detach().to(torch.float64).contiguous().cpu()
        modules[name] = {"shape": list(f.shape), "damping": f.damping, "n_tokens": f.n_tokens, "n_docs": f.n_docs}
    doc = {"format_version": FORMAT_VERSION, "dtype": "float64", "modules": modules, **(meta or {})}
    return st_save(tensors, metadata={_META_KEY: json.dumps(doc, sort_keys=True)})


def _header_metadata(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    raw = header.get("__metadata__", {}).get(_META_KEY)
    if raw is None:
        raise ValueError("not a ray-influence factors file: no 'ray_influence' metadata")
    return json.loads(raw)


def factors_from_bytes(data: bytes) -> tuple[dict[str, ModuleFactors], dict[str, Any]]:
    """Inverse of :func:`factors_to_bytes`: ``(factors, metadata)``."""
    meta = _header_metadata(data)
    tensors = st_load(data)
    factors = {}
    for name, m in meta["modules"].items():
        f = ModuleFactors(
            q_a=tensors[f"{name}/q_a"],
            q_g=tensors[f"{name}/q_g"],
            lam=tensors[f"{name}/lam"],
            damping=float(m["damping"]),
            n_tokens=int(m["n_tokens"]),
            n_docs=int(m["n_docs"]),
        )
        if list(f.shape) != list(m["shape"]) or tuple(f.lam.shape) != f.shape:
            raise ValueError(f"factors of {name!r}: stored shape {m['shape']} does not match tensors {tuple(f.lam.shape)}")
        factors[name] = f
    return factors, meta


def save_factors(url: str, factors: Mapping[str, ModuleFactors], meta: Mapping[str, Any] | None = None) -> None:
    """Writes factors to ``url`` (any fsspec URL)."""
    with fsspec.open(url, "wb") as fh:
        fh.write(factors_to_bytes(factors, meta))


def load_factors(url: str) -> tuple[dict[str, ModuleFactors], dict[str, Any]]:
    """Reads factors written by :func:`save_factors`."""
    with fsspec.open(url, "rb") as fh:
        return factors_from_bytes(fh.read())
