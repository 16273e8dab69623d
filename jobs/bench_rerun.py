"""What the driver reads on a rerun: bytes and seconds, with every stage already done.

Builds the job benchmark's corpus (``jobs/bench_throughput.py --sections job``: a small
GPT-NeoX, word documents, 64 per partition), runs the whole job once (index mode), then
reruns it: every stage finds its pieces and plans from them. Counted in the driver
process only (the workers are other processes): the bytes it reads from the run dir
(:meth:`RunDir.read_bytes`, which every piece, marker and table read goes through), and the
wall and CPU seconds of the rerun's fit and index stages (their planning, as nothing is
left to do; the wall time includes starting the workers' processes when they are first used).

    python jobs/bench_rerun.py --docs 1024 [--out rerun.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=1024, help="corpus documents (the job benchmark's largest N is 4 x 256)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from bench_throughput import MODELS, tiny_model
    from ray_influence.config import config_from_dict
    from ray_influence.driver import run_job
    from ray_influence.rundir import RunDir
    from ray_influence.toy import save_toy_pair, word_text, word_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-rerun-"))
    words = [f"w{i}" for i in range(2000)]
    tok = word_tokenizer([" ".join(words)])
    spec = MODELS["small"]
    save_toy_pair(root, tiny_model("gpt_neox", len(tok), spec["hidden"], spec["layers"], spec["heads"], positions=512),
                  tok)
    rng = random.Random(0)

    def text() -> str:
        return word_text(rng, words, 32, 128)

    (root / "ft.jsonl").write_text("".join(json.dumps({"prompt": text()[:200], "completion": " w1 w2"}) + "\n"
                                          for _ in range(32)))
    (root / "q.jsonl").write_text("".join(json.dumps({"query_id": f"q{i}", "prompt": "w5 w6", "completion": " w7 w8"})
                                         + "\n" for i in range(16)))
    corpus = root / "corpus.parquet"
    pq.write_table(pa.table({"doc_id": list(range(args.docs)), "text": [text() for _ in range(args.docs)]}), corpus)
    cfg = config_from_dict({
        "run_dir": str(root / "run"), "pretrained_model": str(root / "pt"), "finetuned_model": str(root / "ft"),
        "corpus": {"path": str(corpus), "max_length": 128, "partition_docs": 64},
        "finetune_data": {"path": str(root / "ft.jsonl")}, "queries": {"path": str(root / "q.jsonl")},
        "ekfac": {"covariance_max_docs": 128}, "projection": {"dim": args.dim},
        "scoring": {"methods": ["multi_stage"], "top_k": 10, "mode": "index"},
        "cluster": {"replicas": 2, "num_cpus_per_worker": max(args.cpus // 2, 1), "max_tokens_per_batch": 2048}})

    from ray_influence.driver import Job

    read = {"bytes": 0, "calls": 0}
    original = RunDir.read_bytes
    cpu = {"fit_index_s": 0.0}  # the driver process's CPU seconds in the fit and index stages
    stages = {name: getattr(Job, name) for name in ("fit", "index")}

    def timed(fn):
        def run(self, *a, **kw):
            t0 = time.process_time()
            try:
                return fn(self, *a, **kw)
            finally:
                cpu["fit_index_s"] += time.process_time() - t0
        return run

    def counting(self, rel):
        data = original(self, rel)
        read["bytes"] += len(data)
        read["calls"] += 1
        return data

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        run_job(cfg, progress=False)
        first = time.perf_counter() - t0
        RunDir.read_bytes = counting
        for name, fn in stages.items():
            setattr(Job, name, timed(fn))
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            summary = run_job(cfg, progress=False)
            rerun, rerun_cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            RunDir.read_bytes = original
            for name, fn in stages.items():
                setattr(Job, name, fn)
    finally:
        ray.shutdown()
    index_bytes = sum(f.stat().st_size for f in (root / "run" / "index").rglob("*.safetensors"))
    out = {"docs": args.docs, "first_run_s": round(first, 2), "rerun_s": round(rerun, 2),
           "rerun_fit_plus_index_s": round(summary["timings"]["fit"] + summary["timings"]["index"], 3),
           "driver_cpu_fit_plus_index_s": round(cpu["fit_index_s"], 3), "driver_cpu_rerun_s": round(rerun_cpu, 3),
           "driver_read_bytes": read["bytes"], "driver_read_calls": read["calls"], "index_bytes": index_bytes,
           "index_partitions_recomputed": summary["index"]["partitions"]}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
