"""A tiny two-model world on disk for job tests: models, corpus, fine-tuning data, queries."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ray_influence.toy import perturbed_copy, tiny_model, word_tokenizer

WORDS = ("red blue green cat dog bird runs sits eats big small old new the a of in on "
         "river hill town sings jumps reads").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def corpus_rows(n: int, seed: int, start_id: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"doc_id": start_id + i, "text": sentence(rng, rng.randint(3, 10))} for i in range(n)]


def write_corpus_file(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def build_world(root: Path, arch: str = "gpt_neox", n_docs: int = 20, seed: int = 0, layers: int = 2) -> dict:
    """Saves pt/ft models (+ tokenizer), corpus/part-0.parquet, finetune.jsonl, queries.jsonl.

    Returns:
        A config dict (exact mode, float64, all four methods) pointing at them.
    """
    rng = random.Random(seed)
    docs = corpus_rows(n_docs, seed)
    ft_rows = [{"prompt": sentence(rng, 3), "completion": " " + sentence(rng, 2)} for _ in range(8)]
    queries = [{"query_id": f"q{i}", "prompt": sentence(rng, 3), "completion": " " + sentence(rng, 2)} for i in range(3)]
    tok = word_tokenizer([" ".join(WORDS)])
    pt = tiny_model(arch, len(tok), hidden=16, layers=layers, heads=2, seed=seed)
    ft = perturbed_copy(pt, scale=0.1, seed=seed + 1)
    for name, model in (("pt", pt), ("ft", ft)):
        model.save_pretrained(root / "models" / name)
        tok.save_pretrained(root / "models" / name)
    write_corpus_file(root / "corpus" / "part-0.parquet", docs)
    for name, rows in (("finetune.jsonl", ft_rows), ("queries.jsonl", queries)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "run_dir": str(root / "run"),
        "pretrained_model": str(root / "models" / "pt"),
        "finetuned_model": str(root / "models" / "ft"),
        "corpus": {"path": str(root / "corpus"), "max_length": 16, "partition_docs": 6},
        "finetune_data": {"path": str(root / "finetune.jsonl")},
        "queries": {"path": str(root / "queries.jsonl")},
        "ekfac": {"fisher": True, "fisher_samples": 2, "covariance_max_docs": 1000, "damping": "auto", "seed": 0},
        "projection": {"dim": 0, "seed": 0, "dtype": "float64"},
        "scoring": {"methods": ["multi_stage", "single_stage", "grad_dot", "grad_cos"], "top_k": 5, "mode": "index"},
        "model": {"dtype": "float64"},
        "cluster": {"replicas": 2, "num_cpus_per_worker": 1, "max_tokens_per_batch": 64},
    }


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path
