"""``ray-influence demo``: the whole job end to end on local Ray, on a synthetic two-stage world.

Builds (or reuses) the world of :data:`DEMO_SPEC` (``ray_influence.world``): a tiny
GPT-NeoX pre-trained from scratch on a corpus of fictional facts and distractors, a fully
fine-tuned copy answering questions about part of the facts, and held-out questions as
queries, with the documents that state each answer as ground truth. Then it runs the job
(fit, query, score: the default exact pass) on a local Ray instance and prints the top documents of a few
queries, MRR and recall@10 of every method against the ground truth, and where the
results are.

Job settings (:data:`ray_influence.world.JOB_DEFAULTS`): the default scoring mode (each
document's exact gradient against rank-16 factors of the preconditioned queries, no
index) and the EK-FAC defaults of the config (chosen over ``WORLD_FAMILY``, docs/BENCHMARKS.md),
all four methods, top 50, 2 worker replicas of 1 CPU over 4 corpus partitions.
"""

from __future__ import annotations

import os
import sys
import time

from .world import WorldSpec, attribution_metrics, build_world, job_config, random_baseline, read_results

DEMO_SPEC = WorldSpec()
"""40 entities x 5 relations = 200 facts in 432 documents, 200 distractors; 140 QA pairs
for fine-tuning, 60 held-out queries. Builds in about 15 s on one CPU core."""

SHOWN_QUERIES = 3
K = 10
METHODS = ("multi_stage", "single_stage", "grad_dot", "grad_cos")


def _shown_queries(world) -> list[str]:
    """A few queries the fine-tuned model answers correctly, of different relations when possible."""
    answered = set(world.stats.get("answered", []))
    facts = world.truth["facts"]
    ordered = [q for q in world.truth["queries"] if q in answered] + \
              [q for q in world.truth["queries"] if q not in answered]
    out, relations = [], set()
    for qid in ordered:
        rel = facts[world.truth["queries"][qid]["fact_id"]]["relation"]
        if rel not in relations:
            out.append(qid)
            relations.add(rel)
        if len(out) == SHOWN_QUERIES:
            break
    return out


def _print_world(world) -> None:
    s = world.stats
    print(f"\nworld: {_short(str(world.root))}")
    print(f"  {s['docs']} pre-training documents ({s['fact_docs']} state one of {s['facts']} facts, "
          f"{s['distractors']} distractors), {s['finetune_pairs']} fine-tuning QA pairs, "
          f"{s['queries']} held-out queries")
    print(f"  memorisation: the pre-trained model completes {s['memorisation']:.1%} of the fact statements "
          f"(greedy next token; mean p(value) {s['memorisation_p']:.2f})")
    print(f"  held-out QA: the fine-tuned model answers {s['qa_heldout']:.1%} of the queries "
          f"({s['qa_finetune']:.1%} of its fine-tuning pairs; the pre-trained model: {s['qa_heldout_pretrained']:.1%})")


def _print_top(world, rows: list[dict], qids: list[str], top_k: int) -> None:
    queries = {q["query_id"]: q for q in world.data.queries}
    text = {d["doc_id"]: d["text"] for d in world.data.corpus}
    answered = set(world.stats.get("answered", []))
    for qid in qids:
        q, truth = queries[qid], set(world.truth["queries"][qid]["doc_ids"])
        print(f"\n{qid}: {q['prompt'] + q['completion']!r}  "
              f"(fine-tuned model {'answers it' if qid in answered else 'does not answer it'}; "
              f"ground truth: {', '.join(sorted(truth))})")
        top = sorted((r for r in rows if r["method"] == "multi_stage" and r["query_id"] == qid and r["rank"] <= 3),
                     key=lambda r: r["rank"])
        for r in top:
            mark = "*" if r["doc_id"] in truth else " "
            print(f"  {r['rank']}. {r['score']:+.3e} {mark} {r['doc_id']}  {text[r['doc_id']]!r}")
        firsts = {m: min((r["rank"] for r in rows if r["method"] == m and r["query_id"] == qid
                          and r["doc_id"] in truth), default=None) for m in METHODS}
        print("     first ground-truth document at rank: " + ", ".join(
            f"{m} {'>' + str(top_k) if f is None else f}" for m, f in firsts.items()))
    print("  (multi_stage, top 3; * = a ground-truth document)")


def _print_metrics(world, rows: list[dict]) -> dict:
    metrics = attribution_metrics(rows, world.truth, K)
    base = random_baseline(world.truth, len(world.data.corpus), K)
    print(f"\nattribution vs ground truth ({base['queries']} queries, {len(world.data.corpus)} documents)")
    print(f"  {'method':<13} {'MRR':>6} {'recall@' + str(K):>10}")
    for method in METHODS:
        if method in metrics:
            m = metrics[method]
            print(f"  {method:<13} {m['mrr']:6.3f} {m[f'recall@{K}']:10.3f}")
    print(f"  {'random':<13} {base['mrr']:6.3f} {base[f'recall@{K}']:10.3f}   (expectation of a random ranking)")
    return metrics


def _short(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (shorter commands to copy)."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def run_example(workdir: str, seed: int = 0) -> dict:
    """Builds (or reuses) the demo world, runs the whole job on local Ray, prints what it found.

    Returns:
        ``{"metrics": {method: {...}}, "random": {...}, "world": stats, "results": path}``.
    """
    import dataclasses

    import ray
    import yaml

    from .config import config_from_dict
    from .driver import run_job

    t0 = time.perf_counter()
    world = build_world(dataclasses.replace(DEMO_SPEC, seed=seed), workdir)
    _print_world(world)
    cfg_dict = job_config(world)
    config_path = os.path.join(os.path.abspath(workdir), "config.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump(cfg_dict, fh, sort_keys=False)
    cfg = config_from_dict(cfg_dict)
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 2), dashboard_host="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
    t1 = time.perf_counter()
    summary = run_job(cfg)
    t2 = time.perf_counter()

    rows = read_results(cfg.run_dir)
    qids = _shown_queries(world)
    _print_top(world, rows, qids, cfg.scoring.top_k)
    metrics = _print_metrics(world, rows)

    corpus = summary.get("score_corpus") or summary["index"]
    print(f"\n{corpus['docs']} documents scored this run ({cfg.scoring.mode} mode, "
          f"{corpus['partitions_total']} partitions); the job took {t2 - t1:.1f}s, {time.perf_counter() - t0:.1f}s in all")
    energy = summary.get("query", {}).get("retained_energy", {})
    if energy:
        print("query energy kept at rank " + str(cfg.scoring.query_rank) + ": "
              + ", ".join(f"{m} min {e['min']:.3f} mean {e['mean']:.3f}" for m, e in energy.items()))
    print(f"config: {_short(config_path)}")
    results = _short(f"{cfg.run_dir}/results")
    glob = f"{results}/**/*.parquet"
    sql = (f"select method, rank, doc_id, score, doc_text from read_parquet('{glob}', hive_partitioning=true) "
           f"where query_id='{qids[0]}' and rank <= 5 order by method, rank")
    print(f"results: {results}/  (Parquet, hive-partitioned by method)")
    print(f"  duckdb -c \"{sql}\"")
    print(f"  {_short(sys.executable)} -c \"import duckdb; duckdb.sql(\\\"{sql}\\\").show(max_width=200)\"")
    return {"metrics": metrics, "random": random_baseline(world.truth, len(world.data.corpus), K),
            "world": world.stats, "results": results}
