"""Checks that run before any heavy compute, and before anything is written.

Everything here reads only configs, tokenizers, file listings and the small query and
fine-tuning tables; a failure raises a ``ValueError`` subclass with one clear message
(exit code 2).
"""

from __future__ import annotations

from typing import Sequence

import fsspec

from .config import Config, ConfigError
from .data import InputError, check_columns, list_files, read_records

# Config fields that must agree between the pre-trained and the fine-tuned model.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
              "intermediate_size", "n_inner", "num_attention_heads", "n_head", "num_key_value_heads")


def _model_config(path: str, what: str, cfg: Config) -> dict:
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(f"{root}/config.json"):
        raise InputError(f"{what} {path!r} is not a model directory (no config.json)")
    import json

    with fs.open(f"{root}/config.json", "r") as fh:
        model_cfg = json.load(fh)
    if model_cfg.get("auto_map") and not cfg.model.trust_remote_code:
        raise InputError(f"{what} {path!r} needs custom code (auto_map in config.json); "
                         "set model.trust_remote_code: true to allow it")
    names = [f.rsplit("/", 1)[-1] for f in fs.ls(root, detail=False)]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    if not has_safetensors and has_pickle and not cfg.model.allow_pickle:
        raise InputError(f"{what} {path!r} has only pickle weights; convert them to safetensors "
                         "or set model.allow_pickle: true")
    if not has_safetensors and not has_pickle:
        raise InputError(f"{what} {path!r} holds no weights")
    return model_cfg


def check_models(cfg: Config) -> None:
    """Same architecture and module shapes, and the same tokenizer, in both models."""
    pt = _model_config(cfg.pretrained_model, "pretrained_model", cfg)
    ft = _model_config(cfg.finetuned_model, "finetuned_model", cfg)
    for key in SHAPE_KEYS:
        if pt.get(key) != ft.get(key):
            raise InputError(f"pretrained and finetuned models differ in {key!r}: "
                             f"{pt.get(key)!r} vs {ft.get(key)!r}; they must share an architecture")
    from .models import load_tokenizer

    tok_pt = load_tokenizer(cfg.pretrained_model, cfg.model.trust_remote_code)
    tok_ft = load_tokenizer(cfg.finetuned_model, cfg.model.trust_remote_code)
    if tok_pt.get_vocab() != tok_ft.get_vocab() or tok_pt.eos_token_id != tok_ft.eos_token_id:
        raise InputError("the pretrained and finetuned tokenizers differ (vocabulary or EOS); "
                         "attribution across stages needs one tokenizer")
    n_blocks = pt.get("num_hidden_layers", pt.get("n_layer"))
    if n_blocks is not None and cfg.cluster.shards > n_blocks:
        raise ConfigError(f"'cluster.shards' is {cfg.cluster.shards} but the model has {n_blocks} decoder "
                          f"blocks; use at most {n_blocks} shards")
    if cfg.cluster.shards > 1:
        from .shard_model import ADAPTERS

        if pt.get("model_type") not in ADAPTERS:
            raise ConfigError(f"'cluster.shards' is {cfg.cluster.shards}, but model shards support the "
                              f"architectures {sorted(ADAPTERS)} and this model is {pt.get('model_type')!r}; "
                              "use cluster.shards: 1")
        for path, what in ((cfg.pretrained_model, "pretrained_model"), (cfg.finetuned_model, "finetuned_model")):
            fs, root = fsspec.core.url_to_fs(path)
            if not any(n.endswith(".safetensors") for n in fs.ls(root, detail=False)):
                raise InputError(f"{what} {path!r}: model shards read safetensors weights only")


def check_queries(cfg: Config, tokenizer=None) -> None:
    """Raises :class:`InputError` when the queries leave nothing to attribute.

    Single queries that are bad are not errors: the query stage skips and lists them
    (:func:`ray_influence.query_input.select_queries`, the same decision).

    Args:
        tokenizer: the fine-tuned model's tokenizer (loaded from ``finetuned_model`` if None).
    """
    from .query_input import load_queries

    if tokenizer is None:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(cfg.finetuned_model, cfg.model.trust_remote_code)
    load_queries(cfg.queries, tokenizer)


def check_finetune_data(cfg: Config) -> None:
    f = cfg.finetune_data
    rows = read_records(f.path, [f.prompt_column, f.completion_column])
    if not rows:
        raise InputError(f"finetune_data {f.path!r} holds no rows")


# Config keys a run directory is bound to; changing them needs a fresh run_dir.
PINNED_KEYS = ("pretrained_model", "finetuned_model", "corpus.text_column", "corpus.id_column",
               "corpus.max_length", "corpus.partition_docs", "finetune_data", "modules", "ekfac",
               "projection", "model", "cluster.shards")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def check_run_dir(cfg: Config) -> None:
    """Raises :class:`ConfigError` when ``run_dir`` holds a run whose pinned keys differ."""
    from .rundir import RunDir

    run = RunDir(cfg.run_dir)
    if not run.exists("run.json"):
        return
    old, new = run.read_json("run.json")["config"], cfg.to_dict()
    for key in PINNED_KEYS:
        if _get(old, key) != _get(new, key):
            raise ConfigError(
                f"run_dir {cfg.run_dir!r} holds a run with a different {key!r} "
                f"({_get(old, key)!r}, now {_get(new, key)!r}); use a new run_dir"
            )


def preflight(cfg: Config, stages: Sequence[str]) -> None:
    """All the cheap checks the given stages need."""
    check_run_dir(cfg)
    for f in list_files(cfg.corpus.path):
        check_columns(f, [cfg.corpus.id_column, cfg.corpus.text_column])
    check_models(cfg)
    if "fit" in stages:
        check_finetune_data(cfg)
    if "query" in stages:
        check_queries(cfg)
