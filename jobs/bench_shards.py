"""Model shards: memory per shard actor and index-pass throughput, S = 1, 2, 4.

    .venv/bin/python jobs/bench_shards.py --out docs/bench_shards.json

Builds a GPT-NeoX-style model of about 55M parameters from a config (12 blocks), saves
it, and runs the job's index stage on local Ray with ``cluster.shards`` = 1, 2 and 4 on
the same cores (``--cpus``): S = 1 gets all of them as one worker; S shards get
``cpus / S`` each. Reports, per shard actor, the parameter bytes it holds and its peak
resident memory (``ru_maxrss``), next to a bare actor that loaded no model; and index
tokens/s, both over the whole stage (actor start and model load included) and in steady
state (partitions after each replica's first). A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

MODEL = dict(vocab=16384, hidden=512, layers=12, heads=8)  # ~55M parameters, GPT-NeoX style


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs (the same for every S)")
    p.add_argument("--docs", type=int, default=96)
    p.add_argument("--partition-docs", type=int, default=16)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per micro-batch")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def build(root: Path, args) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_influence.toy import save_toy_pair, tiny_model, word_text, word_tokenizer

    words = [f"w{i}" for i in range(4000)]
    tok = word_tokenizer([" ".join(words)])
    pt = tiny_model("gpt_neox", MODEL["vocab"], MODEL["hidden"], MODEL["layers"], MODEL["heads"], positions=512)
    n_params = sum(p.numel() for p in pt.parameters())
    save_toy_pair(root, pt, tok)
    rng = random.Random(0)

    def text() -> str:
        return word_text(rng, words, args.min_len, args.max_len)

    pq.write_table(pa.table({"doc_id": list(range(args.docs)), "text": [text() for _ in range(args.docs)]}),
                   root / "corpus.parquet")
    (root / "ft.jsonl").write_text(json.dumps({"prompt": "w1", "completion": " w2"}) + "\n")
    (root / "q.jsonl").write_text(json.dumps({"query_id": "q0", "prompt": "w1", "completion": " w2"}) + "\n")
    return {"root": root, "parameters": n_params}


def one(world: dict, shards: int, args) -> dict:
    import ray

    from ray_influence.config import config_from_dict
    from ray_influence.driver import Job
    from ray_influence.worker import remote_worker

    root = world["root"]
    cfg = config_from_dict({
        "run_dir": str(root / f"run-s{shards}"), "pretrained_model": str(root / "pt"),
        "finetuned_model": str(root / "ft"),
        "corpus": {"path": str(root / "corpus.parquet"), "max_length": args.max_len,
                   "partition_docs": args.partition_docs},
        "finetune_data": {"path": str(root / "ft.jsonl")}, "queries": {"path": str(root / "q.jsonl")},
        "projection": {"dim": args.dim}, "scoring": {"methods": ["multi_stage"], "top_k": 10, "mode": "index"},
        "cluster": {"replicas": 1, "shards": shards, "num_cpus_per_worker": args.cpus / shards,
                    "max_tokens_per_batch": args.max_tokens},
    })
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        bare = remote_worker(cfg)
        bare_stats = ray.get(bare.stats.remote())
        ray.kill(bare)
        job = Job(cfg, progress=False)
        t0 = time.perf_counter()
        summary = job.execute("index")
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    times = job.partition_times
    steady = times[1:]  # one replica: the first partition pays the model load
    workers = sorted(summary.get("workers", []), key=lambda w: w["shard"])
    return {
        "shards": shards, "cpus_per_shard": args.cpus / shards, "wall_s": wall,
        "index_s": summary["timings"]["index"], "tokens": summary["index"]["tokens"],
        "index_tokens_per_s": summary["index"]["tokens"] / summary["timings"]["index"],
        "steady_tokens_per_s": sum(t for t, _ in steady) / sum(s for _, s in steady) if steady else None,
        "bare_actor_max_rss_mb": bare_stats["max_rss_mb"],
        "per_shard": [{"shard": w["shard"], "blocks": w["blocks"], "param_mb": w["param_bytes"] / 2**20,
                       "max_rss_mb": w["max_rss_mb"]} for w in workers],
    }


def table(result: dict) -> str:
    lines = [f"model: GPT-NeoX style, {result['parameters'] / 1e6:.1f}M parameters, {MODEL['layers']} blocks; "
             f"{result['docs']} docs, {result['cpus']} CPUs", "",
             "| S | shard | blocks | parameters held (MB) | peak RSS (MB) |", "|---:|---:|---|---:|---:|"]
    for r in result["runs"]:
        for w in r["per_shard"]:
            blocks = f"[{w['blocks'][0]}, {w['blocks'][1]})" if w["blocks"] else "all"
            lines.append(f"| {r['shards']} | {w['shard']} | {blocks} | {w['param_mb']:.1f} | {w['max_rss_mb']:.0f} |")
    lines += ["", f"bare actor (torch + transformers imported, no model): "
                  f"{result['runs'][0]['bare_actor_max_rss_mb']:.0f} MB peak RSS", "",
              "| S | CPUs per shard | index stage s | tokens/s (stage) | tokens/s (steady) | vs S=1 (steady) |",
              "|---:|---:|---:|---:|---:|---:|"]
    base = result["runs"][0]["steady_tokens_per_s"]
    for r in result["runs"]:
        rel = f"{r['steady_tokens_per_s'] / base:.2f}x" if base and r["steady_tokens_per_s"] else "-"
        lines.append(f"| {r['shards']} | {r['cpus_per_shard']:g} | {r['index_s']:.1f} | {r['index_tokens_per_s']:,.0f} "
                     f"| {r['steady_tokens_per_s'] or 0:,.0f} | {rel} |")
    return "\n".join(lines)


def main(args) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    world = build(root, args)
    print(f"model: {world['parameters'] / 1e6:.1f}M parameters in {root}", file=sys.stderr)
    runs = []
    for s in args.shards:
        runs.append(one(world, s, args))
        print(json.dumps(runs[-1]), file=sys.stderr)
    result = {"parameters": world["parameters"], "docs": args.docs, "cpus": args.cpus, "runs": runs,
              "args": vars(args)}
    by_s = {r["shards"]: r for r in runs}
    if 1 in by_s and 2 in by_s and by_s[1]["steady_tokens_per_s"]:
        result["index_s2_over_s1"] = by_s[2]["steady_tokens_per_s"] / by_s[1]["steady_tokens_per_s"]
    print(table(result))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
