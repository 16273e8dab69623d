"""``ray-influence demo``: the whole job end to end on local Ray, on a toy world.

Builds a tiny GPT-NeoX and a word tokenizer from configs, pre-trains it on a toy corpus
of facts, fine-tunes a copy on question/answer pairs, saves both with
``save_pretrained``, writes the corpus (Parquet), the fine-tuning data and the queries
(JSONL) and a config, then runs the job (fit, index, query, score) on a local Ray
instance and prints the top pre-training documents of each query.
"""

from __future__ import annotations

import os
import time

from .tokens import tokenize_document, tokenize_prompt_completion
from .toy import tiny_model, train, word_tokenizer

PEOPLE = ["alva", "brin", "cato", "dara", "elko", "fenn", "gila", "hale"]
CITIES = ["oslo", "lima", "kiev", "rome", "baku", "doha", "riga", "bern"]
FOODS = ["rice", "figs", "kale", "plum", "corn", "nuts", "eggs", "lamb"]


def toy_corpus() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(corpus [(doc_id, text)], fine-tune [(prompt, completion)], queries [(id, prompt, completion)])."""
    corpus, finetune, queries = [], [], []
    for i, p in enumerate(PEOPLE):
        city, food = CITIES[i], FOODS[(i * 3) % len(FOODS)]
        corpus.append((f"{p}-city", f"{p} lives in {city} ."))
        corpus.append((f"{p}-food", f"{p} likes to eat {food} ."))
        corpus.append((f"{p}-noise", f"{p} met {PEOPLE[(i + 1) % len(PEOPLE)]} on a sunny day ."))
        if i < 5:
            finetune.append((f"where does {p} live ?", f" {city}"))
        else:
            queries.append((f"q-{p}", f"where does {p} live ?", f" {city}"))
    return corpus, finetune, queries


def build_world(workdir: str, seed: int = 0) -> dict:
    """Writes the toy world under ``workdir`` (models, corpus, fine-tuning data, queries).

    Models are trained once and reused on later runs (their directories are the cache).

    Returns:
        The job config (a dict) for it, with ``run_dir`` at ``{workdir}/run``.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus, finetune, queries = toy_corpus()
    root = os.path.abspath(workdir)
    pt_dir, ft_dir = os.path.join(root, "models", "pt"), os.path.join(root, "models", "ft")
    os.makedirs(root, exist_ok=True)
    pq.write_table(pa.table({"doc_id": [i for i, _ in corpus], "text": [t for _, t in corpus]}),
                   os.path.join(root, "corpus.parquet"))
    with open(os.path.join(root, "finetune.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in finetune)
    with open(os.path.join(root, "queries.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"query_id": q, "prompt": p, "completion": c}) + "\n" for q, p, c in queries)
    if not (os.path.exists(os.path.join(ft_dir, "config.json")) and os.path.exists(os.path.join(pt_dir, "config.json"))):
        texts = [t for _, t in corpus] + [p + c for p, c in finetune] + [p + c for _, p, c in queries]
        tok = word_tokenizer(texts)
        docs = [tokenize_document(tok, i, t, 64) for i, t in corpus]
        ft_examples = [tokenize_prompt_completion(tok, f"ft{i}", p, c, 64, add_eos=True)
                       for i, (p, c) in enumerate(finetune)]
        model = train(tiny_model("gpt_neox", len(tok), hidden=32, layers=2, heads=4, seed=seed), docs, steps=150)
        model.save_pretrained(pt_dir)
        tok.save_pretrained(pt_dir)
        model = train(model, ft_examples, steps=40, lr=1e-3)
        model.save_pretrained(ft_dir)
        tok.save_pretrained(ft_dir)
    return {
        "run_dir": os.path.join(root, "run"),
        "pretrained_model": pt_dir,
        "finetuned_model": ft_dir,
        "corpus": {"path": os.path.join(root, "corpus.parquet"), "max_length": 64, "partition_docs": 8},
        "finetune_data": {"path": os.path.join(root, "finetune.jsonl"), "max_length": 64},
        "queries": {"path": os.path.join(root, "queries.jsonl"), "max_length": 64},
        "ekfac": {"fisher_samples": 4, "seed": seed},
        "projection": {"dim": 32, "seed": seed},
        "scoring": {"methods": ["multi_stage", "single_stage", "grad_dot", "grad_cos"], "top_k": 10},
        "cluster": {"replicas": 2, "num_cpus_per_worker": 1},
    }


def run_example(workdir: str, seed: int = 0) -> dict:
    """Builds (or reuses) the toy world, runs the whole job on local Ray, prints the top-3."""
    import duckdb
    import ray
    import yaml

    from .config import config_from_dict
    from .driver import run_job

    t0 = time.perf_counter()
    cfg_dict = build_world(workdir, seed)
    config_path = os.path.join(os.path.abspath(workdir), "config.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump(cfg_dict, fh, sort_keys=False)
    cfg = config_from_dict(cfg_dict)
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 2), dashboard_host="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
    summary = run_job(cfg)
    results = f"{cfg.run_dir}/results/**/*.parquet"
    rows = duckdb.sql(
        f"select query_id, rank, doc_id, score, doc_text from read_parquet('{results}', hive_partitioning=true) "
        "where method = 'multi_stage' and rank <= 3 order by query_id, rank").fetchall()
    queries = {q: p + c for q, p, c in toy_corpus()[2]}
    out: dict = {}
    for qid, rank, doc_id, score, text in rows:
        if qid not in out:
            print(f"\n{qid}: {queries[qid]!r}  (multi_stage, top 3)")
            out[qid] = []
        out[qid].append((doc_id, score))
        print(f"  {rank}. {score:+.4e}  {doc_id:<12} {text!r}")
    idx = summary["index"]
    print(f"\n{idx['docs']} documents indexed this run, {idx['partitions_total']} partitions in the index; "
          f"the job took {sum(summary['timings'].values()):.1f}s, "
          f"{time.perf_counter() - t0:.1f}s in all")
    print(f"config: {config_path}")
    print(f"results: {cfg.run_dir}/results/  (hive-partitioned by method)")
    print(f"  duckdb -c \"select * from read_parquet('{results}', hive_partitioning=true) "
          "where query_id='q-fenn' order by method, rank\"")
    return out
