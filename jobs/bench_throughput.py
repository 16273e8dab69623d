"""Throughput of every pass against a plain training step, scoring, the job, and scaling.

    .venv/bin/python jobs/bench_throughput.py --out docs/bench_throughput.json

Everything on one model runs on the same batches and the same threads, so the ratios
are what to read (tokens per second vary with the machine). Prints a markdown table and
writes JSON. A benchmark, not a test: nothing here asserts.

Sections:
  passes   tokens/s of a forward+backward training step (weight gradients, no optimizer
           step) vs the covariance, Λ, index (projected) and query (exact) passes
  rotation the Λ pass with every rotation per token vs the per-document choice (ekfac.rotates_per_token),
           on the --long documents (not in the default sections)
  exact    the default exact pass (scoring.mode: exact): tokens/s of the corpus pass scoring
           exact document gradients against Q rank-r query factors (--queries, --rank), vs a
           training step and the projected index pass, in the same interleaved rounds; the
           modules' sides (low rank / formed DW) and the process's peak RSS
           (not in the default sections:  --sections exact --out docs/bench_exact.json)
  scoring  (documents x queries)/s of reading index pieces + scores + top-k, vs a bare matmul
  job      the whole job on local Ray: wall time per stage, peak RSS per worker, at N, 2N, 4N
           documents; 1 replica on 1 core vs 2 replicas on 2 cores; and scoring.fused at 2N
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from ray_influence import attribution  # noqa: E402
from ray_influence.ekfac import Fisher  # noqa: E402
from ray_influence.modules import find_tracked_modules  # noqa: E402
from ray_influence.passes import freeze  # noqa: E402
from ray_influence.projection import make_projection  # noqa: E402
from ray_influence.tokens import Example, batches, collate  # noqa: E402
from ray_influence.toy import tiny_model  # noqa: E402

MODELS = {  # GPT-NeoX style
    "small": dict(vocab=8192, hidden=256, layers=6, heads=4),     # ~9M parameters
    "large": dict(vocab=16384, hidden=512, layers=12, heads=8),   # ~54M parameters
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["small", "large"], choices=list(MODELS))
    p.add_argument("--docs", type=int, default=64, help="documents per pass measurement (of --min/--max-len)")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--long", nargs=2, type=int, default=None, metavar=("MIN", "MAX"),
                   help="also measure the passes on documents of MIN..MAX tokens (as many tokens in all)")
    p.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per micro-batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--dim", type=int, default=32, help="projection dim of the index pass")
    p.add_argument("--job-docs", type=int, default=256, help="N for the job scaling runs (N, 2N, 4N)")
    p.add_argument("--sections", nargs="+", default=["passes", "scoring", "job"])
    p.add_argument("--queries", type=int, nargs="+", default=[16, 64, 256, 1024],
                   help="exact section: query vectors scored in one pass")
    p.add_argument("--rank", type=int, default=None, help="exact section: query rank (default: scoring.query_rank's)")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def random_docs(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(lo, hi)
        out.append(Example(f"d{i}", tuple(rng.randrange(3, vocab) for _ in range(length)),
                           tuple(t > 0 for t in range(length))))
    return out


def interleaved_times(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run in ``repeats`` rounds, after one warm-up round.

    Every round runs each function once, in turn, so load that comes and goes on the
    machine falls on all of them alike (rather than on whichever ran while it lasted).
    """
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def training_step_pass(model, examples, max_tokens: int) -> None:
    """Forward + backward with weight gradients (what a training step costs, no optimizer)."""
    model.requires_grad_(True)
    try:
        for group in batches(sorted(examples, key=len), max_tokens):
            b = collate(group)
            logits = model(input_ids=b.input_ids, attention_mask=b.token_mask.long()).logits[:, :-1]
            logp = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
            (-(logp * b.loss_mask[:, 1:]).sum()).backward()
            model.zero_grad(set_to_none=True)
    finally:
        model.requires_grad_(False)


def bench_passes(name: str, args, lo: int, hi: int, n_docs: int) -> dict:
    spec = MODELS[name]
    model = freeze(tiny_model("gpt_neox", spec["vocab"], spec["hidden"], spec["layers"], spec["heads"],
                              positions=max(512, hi)))
    n_params = sum(p.numel() for p in model.parameters())
    specs = find_tracked_modules(model)
    docs = random_docs(n_docs, spec["vocab"], lo, hi)
    tokens = sum(len(d) for d in docs)
    cov = attribution.covariance_pass(model, docs[:8], specs, Fisher.TRUE)
    from ray_influence import ekfac

    bases = {n: ekfac.eigenbasis(c) for n, c in cov.items()}
    projs = {n: make_projection(s, args.dim, 0) for n, s in specs.items()}
    query_docs = docs[:max(1, n_docs // 4)]
    runs = {
        "training_step": lambda: training_step_pass(model, docs, args.max_tokens),
        "covariance": lambda: attribution.covariance_pass(model, docs, specs, Fisher.TRUE, 1, 0, args.max_tokens),
        "lambda": lambda: attribution.lambda_pass(model, docs, specs, bases, Fisher.TRUE, 1, 0, args.max_tokens),
        "index": lambda: attribution.document_gradients(model, docs, specs, projs, args.max_tokens),
        "query_exact": lambda: attribution.document_gradients(model, query_docs, specs, None, args.max_tokens),
    }
    times = interleaved_times(runs, args.repeats)
    out = {"model": name, "params": n_params, "docs": len(docs), "lengths": [lo, hi], "tokens": tokens,
           "threads": args.threads, "seconds": times}
    for key, ts in times.items():
        n_tok = tokens if key != "query_exact" else sum(len(d) for d in query_docs)
        out[f"{key}_tokens_per_s"] = n_tok / statistics.median(ts)
    ref = out["training_step_tokens_per_s"]
    out["index_vs_training"] = out["index_tokens_per_s"] / ref
    # covariance + Λ per token, in training steps (lower is better): the median over rounds
    # of each round's own ratio, and its range
    per_round = [(c + lam) / t for c, lam, t in zip(times["covariance"], times["lambda"], times["training_step"])]
    out["cov_plus_lambda_vs_training"] = statistics.median(per_round)
    out["cov_plus_lambda_vs_training_range"] = [min(per_round), max(per_round)]
    return out


def bench_exact(name: str, args, lo: int, hi: int, n_docs: int) -> dict:
    """The exact pass against Q random rank-r query factors, vs a training step and the index pass.

    The factors are random (the pass's cost does not depend on their values) and float32,
    the work dtype of a float32 model; a job also holds the float64 copy it read.
    """
    import resource

    from ray_influence.collectors import QueryScoreCollector
    from ray_influence.config import DEFAULT_QUERY_RANK
    from ray_influence.lowrank import QueryFactors
    from ray_influence.passes import Labels

    spec = MODELS[name]
    rank = args.rank or DEFAULT_QUERY_RANK
    model = freeze(tiny_model("gpt_neox", spec["vocab"], spec["hidden"], spec["layers"], spec["heads"],
                              positions=max(512, hi)))
    specs = find_tracked_modules(model)
    docs = random_docs(n_docs, spec["vocab"], lo, hi)
    tokens = sum(len(d) for d in docs)
    projs = {n: make_projection(s, args.dim, 0) for n, s in specs.items()}
    gen = torch.Generator().manual_seed(0)
    out = {"model": name, "params": sum(p.numel() for p in model.parameters()), "docs": n_docs, "lengths": [lo, hi],
           "tokens": tokens, "rank": rank, "threads": args.threads, "by_queries": []}
    sides: dict = {}

    def factors(q: int) -> dict:
        return {n: QueryFactors(torch.randn(q, s.d_out, rank, generator=gen), torch.randn(q, s.d_in_aug, rank, generator=gen),
                                torch.ones(q), torch.ones(q)) for n, s in specs.items()}

    def exact(f: dict, q: int) -> None:
        col = QueryScoreCollector(f)
        attribution.run_batches(model, docs, specs, col, Labels.DATA, 0, args.max_tokens)
        sides[q] = {n: sorted(v) for n, v in col.sides.items()}

    for q in args.queries:
        f = factors(q)
        runs = {"training_step": lambda: training_step_pass(model, docs, args.max_tokens),
                "index": lambda: attribution.document_gradients(model, docs, specs, projs, args.max_tokens),
                "exact": lambda: exact(f, q)}
        times = interleaved_times(runs, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        n_low = sum(1 for v in sides[q].values() if v == ["low_rank"])
        row = {"queries": q, "seconds": times, "exact_tokens_per_s": tokens / med["exact"],
               "exact_vs_training": med["training_step"] / med["exact"], "exact_vs_index": med["index"] / med["exact"],
               "modules_low_rank": n_low, "modules_formed": len(sides[q]) - n_low,
               "factor_bytes_float32": sum((s.d_out + s.d_in_aug) * rank * q * 4 for s in specs.values()),
               "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        out["by_queries"].append(row)
        print(f"exact {name} Q={q}: {row['exact_vs_training']:.2f}x a training step, {row['exact_vs_index']:.2f}x "
              f"the index pass; {n_low} modules low rank, {row['modules_formed']} formed; peak RSS "
              f"{row['max_rss_mb']:.0f} MB", flush=True)
        del f
    return out


def bench_rotation(name: str, args, lo: int, hi: int, n_docs: int) -> dict:
    """The Λ pass with every rotation forced per token, against the cost model's choice (ekfac.rotates_per_token)."""
    from ray_influence import ekfac

    spec = MODELS[name]
    model = freeze(tiny_model("gpt_neox", spec["vocab"], spec["hidden"], spec["layers"], spec["heads"],
                              positions=max(512, hi)))
    specs = find_tracked_modules(model)
    docs = random_docs(n_docs, spec["vocab"], lo, hi)
    cov = attribution.covariance_pass(model, docs[:8], specs, Fisher.TRUE)
    bases = {n: ekfac.eigenbasis(c) for n, c in cov.items()}
    choose = ekfac.rotates_per_token

    def lam(forced: bool):
        ekfac.rotates_per_token = (lambda *a: (True, True)) if forced else choose
        try:
            return attribution.lambda_pass(model, docs, specs, bases, Fisher.TRUE, 1, 0, args.max_tokens)
        finally:
            ekfac.rotates_per_token = choose

    a, b = lam(True), lam(False)
    diff = max(((a[n].lam_sum - b[n].lam_sum).norm() / a[n].lam_sum.norm()).item() for n in a)
    times = interleaved_times({"per_token": lambda: lam(True), "cost_model": lambda: lam(False)}, args.repeats)
    t_tok, t_model = statistics.median(times["per_token"]), statistics.median(times["cost_model"])
    return {"model": name, "lengths": [lo, hi], "docs": n_docs, "tokens": sum(len(d) for d in docs),
            "seconds": times, "per_token_s": t_tok, "cost_model_s": t_model, "speedup": t_tok / t_model,
            "lambda_max_rel_diff": diff}


def bench_scoring(args) -> dict:
    """The score stage of one worker (``ReplicaActor.score`` per piece + the driver's top-k merge) vs a bare matmul.

    Both sides see the same shapes and dtypes: the worker streams each float32 piece from
    disk (read + sha256 in a background thread), scores it in float32 and takes its top-k;
    the bare matmul multiplies the same float32 query matrix with the same pieces, already
    in memory, and does nothing else.
    """
    from types import SimpleNamespace

    from ray_influence.config import config_from_dict
    from ray_influence.data import Document, InputFile, Partition
    from ray_influence.reducer import merge_topk
    from ray_influence.store import read_index_piece, write_index_piece, write_query_vectors
    from ray_influence.worker import ReplicaActor as Worker

    n_docs, n_parts, q, d, k = 4096, 8, 64, 32 * 32 * 48, 100  # 48 modules of 32 x 32
    root = tempfile.mkdtemp(prefix="bench-score-")
    cfg = config_from_dict({"run_dir": root, "pretrained_model": root, "finetuned_model": root,
                            "corpus": {"path": root}, "finetune_data": {"path": root}, "queries": {"path": root},
                            "scoring": {"methods": ["grad_dot"], "top_k": k},
                            "cluster": {"num_cpus_per_worker": args.threads}})
    worker = Worker(cfg)
    f = InputFile("file:///bench.parquet", "bench.parquet", "parquet", "0")
    per = n_docs // n_parts
    parts = [Partition(f"p-{i:05d}", f, i * per, (i + 1) * per, i * per) for i in range(n_parts)]
    gen = torch.Generator().manual_seed(0)
    for p in parts:
        docs = [Document(j, "", j, j) for j in range(p.start, p.stop)]
        write_index_piece(worker.run, "pretrained", 0, p, docs, torch.randn(per, d, generator=gen), torch.float32, {})
    u = torch.randn(q, d, generator=gen)
    qcfg = SimpleNamespace(prompt_column="prompt", completion_column="completion")
    write_query_vectors(worker.run, 0, [f"q{i}" for i in range(q)], [{"prompt": "", "completion": ""}] * q, qcfg,
                        {"grad_dot": u})

    def full():
        best: dict = {}
        for p in parts:
            part_top = worker.score(p, ["grad_dot"], k)
            best = merge_topk(k, *([best, part_top] if best else [part_top]))
        return best

    pieces = [read_index_piece(worker.run, "pretrained", 0, p)[0] for p in parts]
    u32 = u.to(pieces[0].dtype)  # the worker scores float32 pieces in float32

    def bare():
        for g in pieces:
            u32 @ g.T

    times = {"full": [], "bare": []}
    full(), bare()  # warm-up
    for _ in range(args.repeats):  # interleaved, so both see the same load
        for key, fn in (("full", full), ("bare", bare)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    t_full, t_bare = statistics.median(times["full"]), statistics.median(times["bare"])
    return {"docs": n_docs, "queries": q, "width": d, "top_k": k, "dtype": str(pieces[0].dtype),
            "scored_pairs_per_s": n_docs * q / t_full, "bare_matmul_pairs_per_s": n_docs * q / t_bare,
            "ratio": t_bare / t_full}


def bench_job(args) -> dict:
    """The whole job on local Ray: stage times and worker memory at N, 2N, 4N docs; replicas."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from local_job import run_local
    from ray_influence.toy import save_toy_pair, word_text, word_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-job-"))
    words = [f"w{i}" for i in range(2000)]
    tok = word_tokenizer([" ".join(words)])
    spec = MODELS["small"]
    pt = tiny_model("gpt_neox", len(tok), spec["hidden"], spec["layers"], spec["heads"], positions=512)
    save_toy_pair(root, pt, tok)
    rng = random.Random(0)

    def text() -> str:
        return word_text(rng, words, args.min_len, args.max_len)

    (root / "ft.jsonl").write_text("".join(json.dumps({"prompt": text()[:200], "completion": " w1 w2"}) + "\n"
                                          for _ in range(32)))
    (root / "q.jsonl").write_text("".join(json.dumps({"query_id": f"q{i}", "prompt": "w5 w6", "completion": " w7 w8"})
                                         + "\n" for i in range(16)))

    def one(n_docs: int, replicas: int, cpus: int, fused: bool = False) -> dict:
        corpus = root / f"corpus-{n_docs}.parquet"
        if not corpus.exists():
            pq.write_table(pa.table({"doc_id": list(range(n_docs)), "text": [text() for _ in range(n_docs)]}), corpus)
        cfg = {"run_dir": str(root / f"run-{n_docs}-{replicas}-{cpus}{'-fused' if fused else ''}"), "pretrained_model": str(root / "pt"),
               "finetuned_model": str(root / "ft"), "corpus": {"path": str(corpus), "max_length": args.max_len,
                                                               "partition_docs": 64},
               "finetune_data": {"path": str(root / "ft.jsonl")}, "queries": {"path": str(root / "q.jsonl")},
               "ekfac": {"covariance_max_docs": 128}, "projection": {"dim": args.dim},
               "scoring": {"methods": ["multi_stage"], "top_k": 10, "mode": "fused" if fused else "index"},
               "cluster": {"replicas": replicas, "num_cpus_per_worker": cpus // replicas,
                           "max_tokens_per_batch": args.max_tokens}}
        summary, wall = run_local(cfg, cpus)
        idx = summary["score_corpus" if fused else "index"]
        corpus_s = summary["timings"]["score" if fused else "index"]
        return {"docs": n_docs, "replicas": replicas, "cpus": cpus, "fused": fused, "wall_s": wall,
                "stage_s": summary["timings"], "index_tokens": idx["tokens"],
                "index_tokens_per_s": idx["tokens"] / corpus_s,
                "worker_max_rss_mb": [w["max_rss_mb"] for w in summary.get("workers", [])]}

    n = args.job_docs
    scaling = [one(n * m, 2, 2) for m in (1, 2, 4)]
    replicas = [one(2 * n, 1, 1), scaling[1]]
    fused = one(2 * n, 2, 2, fused=True)
    st = scaling[1]["stage_s"]
    return {"scaling": scaling, "replicas": replicas, "fused": fused,
            "index_plus_score_over_fused": (st["index"] + st["score"]) / fused["stage_s"]["score"],
            "index_time_2n_over_n": scaling[1]["stage_s"]["index"] / scaling[0]["stage_s"]["index"],
            "index_time_4n_over_2n": scaling[2]["stage_s"]["index"] / scaling[1]["stage_s"]["index"],
            "two_replicas_speedup": replicas[1]["index_tokens_per_s"] / replicas[0]["index_tokens_per_s"]}


def table(results: dict) -> str:
    lines = []
    for e in results.get("exact", []):
        lo, hi = e["lengths"]
        lines += [f"\n**exact pass, {e['model']}** ({e['params'] / 1e6:.1f}M parameters, {e['docs']} docs of {lo}–{hi} "
                  f"tokens, rank {e['rank']}, {e['threads']} threads)\n",
                  "| queries | tokens/s | vs training step | vs index pass | modules low rank / formed DW | factors (float32) | peak RSS |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in e["by_queries"]:
            lines.append(f"| {r['queries']} | {r['exact_tokens_per_s']:,.0f} | {r['exact_vs_training']:.2f}x | "
                         f"{r['exact_vs_index']:.2f}x | {r['modules_low_rank']} / {r['modules_formed']} | "
                         f"{r['factor_bytes_float32'] / 2**20:,.0f} MB | {r['max_rss_mb']:,.0f} MB |")
    for p in results.get("passes", []):
        lo, hi = p["lengths"]
        lines += [f"\n**{p['model']}** ({p['params'] / 1e6:.1f}M parameters, {p['docs']} docs of {lo}–{hi} tokens, "
                  f"{p['tokens']} tokens, {p['threads']} threads)\n", "| pass | tokens/s | vs training step |",
                  "|---|---:|---:|"]
        ref = p["training_step_tokens_per_s"]
        for key in ("training_step", "covariance", "lambda", "index", "query_exact"):
            v = p[f"{key}_tokens_per_s"]
            lines.append(f"| {key} | {v:,.0f} | {v / ref:.2f}x |")
        r_lo, r_hi = p["cov_plus_lambda_vs_training_range"]
        lines.append(f"\ncovariance + Λ per token: {p['cov_plus_lambda_vs_training']:.2f} training steps "
                     f"(rounds: {r_lo:.2f}–{r_hi:.2f})")
    for r in results.get("rotation", []):
        lo, hi = r["lengths"]
        lines.append(f"\nΛ pass, {r['model']}, {r['docs']} docs of {lo}–{hi} tokens: every rotation per token "
                     f"{r['per_token_s']:.2f} s, rotation side by cost model {r['cost_model_s']:.2f} s "
                     f"({r['speedup']:.2f}x); Λ max relative difference {r['lambda_max_rel_diff']:.1e}")
    if "scoring" in results:
        s = results["scoring"]
        lines.append(f"\nscoring ({s['docs']} docs x {s['queries']} queries, width {s['width']}, top-{s['top_k']}): "
                     f"{s['scored_pairs_per_s']:,.0f} pairs/s with I/O and top-k vs {s['bare_matmul_pairs_per_s']:,.0f} "
                     f"bare matmul ({s['ratio']:.2f}x)")
    if "job" in results:
        j = results["job"]
        lines += ["\n| docs | replicas | cpus | wall s | fit s | index s | query s | score s | index tok/s | worker peak RSS MB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in j["scaling"] + [j["replicas"][0]]:
            st = r["stage_s"]
            lines.append(f"| {r['docs']} | {r['replicas']} | {r['cpus']} | {r['wall_s']:.1f} | {st['fit']:.1f} | "
                         f"{st['index']:.1f} | {st['query']:.1f} | {st['score']:.1f} | {r['index_tokens_per_s']:,.0f} | "
                         f"{', '.join(f'{m:.0f}' for m in r['worker_max_rss_mb'])} |")
        lines.append(f"\nindex time 2N/N: {j['index_time_2n_over_n']:.2f}, 4N/2N: {j['index_time_4n_over_2n']:.2f}; "
                     f"2 replicas on 2 cores vs 1 on 1: {j['two_replicas_speedup']:.2f}x")
        f, st = j["fused"], j["scaling"][1]["stage_s"]
        lines.append(f"\nfused (scoring.fused, {f['docs']} docs, 2 replicas): wall {f['wall_s']:.1f} s, fit "
                     f"{f['stage_s']['fit']:.1f} s, query {f['stage_s']['query']:.1f} s, score with the corpus pass "
                     f"{f['stage_s']['score']:.1f} s vs index + score {st['index'] + st['score']:.1f} s "
                     f"({j['index_plus_score_over_fused']:.2f}x); worker peak RSS "
                     f"{', '.join(f'{m:.0f}' for m in f['worker_max_rss_mb'])} MB")
    return "\n".join(lines)


def main(args) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(args.threads)
    results: dict = {"args": vars(args), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if "passes" in args.sections:
        results["passes"] = [bench_passes(m, args, args.min_len, args.max_len, args.docs) for m in args.models]
        if args.long:
            lo, hi = args.long
            n_long = max(1, round(args.docs * (args.min_len + args.max_len) / (lo + hi)))  # as many tokens
            results["passes"] += [bench_passes(m, args, lo, hi, n_long) for m in args.models]
    if "rotation" in args.sections:
        lo, hi = args.long or (args.min_len, args.max_len)
        n_rot = max(1, round(args.docs * (args.min_len + args.max_len) / (lo + hi)))
        results["rotation"] = [bench_rotation(m, args, lo, hi, n_rot) for m in args.models]
    if "exact" in args.sections:
        results["exact"] = [bench_exact(m, args, args.min_len, args.max_len, args.docs) for m in args.models]
    if "scoring" in args.sections:
        results["scoring"] = bench_scoring(args)
    if "job" in args.sections:
        results["job"] = bench_job(args)
    print(table(results))
    print(json.dumps(results, indent=1, default=str))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
