"""The job against kronfluence 1.0.1 doing the same work: single-stage EK-FAC influence of every corpus document.

    RAY_AUTH_MODE=disabled .venv/bin/python jobs/bench_vs_kronfluence.py --out docs/bench_vs_kronfluence.json

kronfluence is a benchmark-only extra, kept out of the package's dependencies. It pulls
torchvision (and with it a CUDA torch) if installed plainly; with the CPU torch pinned:

    .venv/bin/pip install --no-deps kronfluence==1.0.1
    .venv/bin/pip install -c <(echo torch==2.13.0) accelerate einops einconv opt-einsum

The same work on both sides, on a world of ``ray_influence.world.WORLD_FAMILY`` (default
the held-out ``wide-bpe``, built or reused under ``--workdir``), on ``--threads`` CPU threads:

- EK-FAC factors of the fine-tuned model θ_ft on the fine-tuning data (the curvature
  single_stage preconditions with), the empirical Fisher, every tracked linear map of the
  blocks (embeddings and lm_head excluded), bias folded into the input;
- damping 0.1 x mean(Λ) per module (kronfluence's ``damping_factor=None`` heuristic,
  the job's ``damping: auto``);
- scores of every query against every corpus document at θ_ft (kronfluence's pairwise
  scores; the job's ``methods: [single_stage]`` with ``top_k`` = the corpus size, so the
  results hold every pair).

The job runs twice through ``run_job`` on a local Ray of ``--threads`` CPUs (2 replicas):
at the default ``scoring.query_rank`` (16) and at full rank (0, exact). Reported: wall
time per phase for each, and Spearman between the score matrices (per query, then the
mean; and over all pairs). A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from local_job import run_local  # noqa: E402
from ray_influence.config import DEFAULT_QUERY_RANK, config_from_dict  # noqa: E402
from ray_influence.models import load_model, load_tokenizer  # noqa: E402
from ray_influence.modules import find_tracked_modules  # noqa: E402
from ray_influence.tokens import Example, tokenize_document, tokenize_prompt_completion  # noqa: E402
from ray_influence.world import WORLD_FAMILY, build_world, job_config, read_results  # noqa: E402

KRONFLUENCE_VERSION = "1.0.1"


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--world", default="wide-bpe", choices=[w.name for w in WORLD_FAMILY])
    p.add_argument("--workdir", default="runs/bench_quality", help="where worlds are built and cached")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each side (Ray CPUs of the job)")
    p.add_argument("--batch", type=int, default=32, help="kronfluence's per-device batch size (documents)")
    p.add_argument("--ranks", type=int, nargs="+", default=[DEFAULT_QUERY_RANK, 0],
                   help="scoring.query_rank of the job's runs (0 = full rank)")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


# ------------------------------------------------------------------------ kronfluence


class _Rows(torch.utils.data.Dataset):
    """Tokenised examples as kronfluence's datasets: one dict per example."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "loss_mask": e.loss_mask}


def _collate(rows: list[dict]) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` ``[B, T]``."""
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    attn = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(r["loss_mask"])
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}


def summed_loss(model, batch: dict) -> torch.Tensor:
    """``Σ -log p(x_t | x_<t)`` over the loss targets of every row (DESIGN.md §2: a sum, never a mean)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").view_as(targets)
    return (nll * batch["loss_mask"][:, 1:]).sum()


def run_kronfluence(model, modules: list[str], ft: list[Example], corpus: list[Example], queries: list[Example],
                    args, out_dir: str) -> tuple[torch.Tensor, dict]:
    """kronfluence's EK-FAC factors on ``ft`` and pairwise scores ``[Q, N]``; seconds per phase."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            if sample:
                raise NotImplementedError("the empirical Fisher only")
            return summed_loss(model, batch)

        def compute_measurement(self, batch, model):
            return summed_loss(model, batch)

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = LanguageModelTask()
    t0 = time.perf_counter()
    model = prepare_model(model, task)
    analyzer = Analyzer("bench", model, task, cpu=True, output_dir=out_dir, disable_tqdm=True,
                        disable_model_save=True)
    loader = DataLoaderKwargs(collate_fn=_collate)
    t1 = time.perf_counter()
    analyzer.fit_all_factors("ekfac", _Rows(ft), per_device_batch_size=args.batch,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
                             dataloader_kwargs=loader, overwrite_output_dir=True)
    t2 = time.perf_counter()
    analyzer.compute_pairwise_scores("pairwise", "ekfac", query_dataset=_Rows(queries), train_dataset=_Rows(corpus),
                                     per_device_query_batch_size=len(queries), per_device_train_batch_size=args.batch,
                                     score_args=ScoreArguments(damping_factor=None), dataloader_kwargs=loader,
                                     overwrite_output_dir=True)
    t3 = time.perf_counter()
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].to(torch.float64)
    return scores, {"setup": t1 - t0, "fit": t2 - t1, "pairwise_scores": t3 - t2, "total": t3 - t0}


# ------------------------------------------------------------------------------- job


def run_ours(world, rank: int, n_docs: int, args, run_dir: str) -> tuple[dict, dict]:
    """The job (single_stage, every pair kept) on a local Ray; ``({query_id: {doc_id: score}}, seconds)``."""
    cfg = job_config(world, run_dir, ekfac={"fisher": "empirical", "damping": "auto"},
                     scoring={"methods": ["single_stage"], "top_k": n_docs, "query_rank": rank,
                              "token_influence_top": 0})
    cfg["cluster"] = {"replicas": 2, "num_cpus_per_worker": args.threads / 2}
    summary, wall = run_local(cfg, args.threads)
    scores: dict = {}
    for r in read_results(run_dir):
        scores.setdefault(str(r["query_id"]), {})[str(r["doc_id"])] = r["score"]
    return scores, {**{k: round(v, 3) for k, v in summary["timings"].items()}, "total": wall}


# --------------------------------------------------------------------------- compare


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of the last axis (ties broken by position: continuous scores have none in practice)."""
    return x.argsort(-1).argsort(-1).to(torch.float64)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's ρ between the rows of ``a`` and ``b`` ``[Q, N]`` (``[Q]``; a 1-D input gives a scalar)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def main(args) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(args.threads)
    fw = next(w for w in WORLD_FAMILY if w.name == args.world)
    world = build_world(fw.spec, args.workdir, log=log)
    cfg = config_from_dict(job_config(world))
    tok = load_tokenizer(str(world.finetuned_model))
    model = load_model(str(world.finetuned_model), "float32")
    length = world.spec.max_length
    corpus = [tokenize_document(tok, str(d["doc_id"]), d["text"], length) for d in world.data.corpus]
    ft_rows = [json.loads(line) for line in Path(world.finetune_path).read_text().splitlines()]
    ft = [tokenize_prompt_completion(tok, f"ft{i}", r["prompt"], r["completion"], length, add_eos=True)
          for i, r in enumerate(ft_rows)]
    q_rows = [json.loads(line) for line in Path(world.queries_path).read_text().splitlines()]
    queries = [tokenize_prompt_completion(tok, str(r["query_id"]), r["prompt"], r["completion"], length, False)
               for r in q_rows]
    modules = list(find_tracked_modules(model, cfg.modules.include, cfg.modules.exclude))
    info = {"world": fw.name, "parameters": sum(p.numel() for p in model.parameters()), "docs": len(corpus),
            "corpus_tokens": sum(len(d) for d in corpus), "finetune_examples": len(ft), "queries": len(queries),
            "tracked_modules": len(modules), "threads": args.threads}
    log(f"world {fw.name}: {json.dumps(info)}")
    res: dict = {"args": vars(args), "info": info, "versions": {
        "torch": torch.__version__, "python": platform.python_version(), "kronfluence": KRONFLUENCE_VERSION}}

    tmp = Path(tempfile.mkdtemp(prefix="bench-kf-"))
    k_scores, k_times = run_kronfluence(model, modules, ft, corpus, queries, args, str(tmp / "kronfluence"))
    res["kronfluence"] = {"seconds": k_times}
    log(f"kronfluence: {json.dumps(k_times)}")
    qids, dids = [q.key for q in queries], [d.key for d in corpus]
    res["ours"] = []
    for rank in args.ranks:
        ours, times = run_ours(world, rank, len(corpus), args, str(tmp / f"run-rank{rank}"))
        mat = torch.tensor([[ours[q][d] for d in dids] for q in qids if q in ours], dtype=torch.float64)
        kept = [i for i, q in enumerate(qids) if q in ours]
        rho = spearman(mat, k_scores[kept])
        row = {"query_rank": rank, "seconds": times, "queries_scored": len(kept),
               "spearman_per_query_mean": float(rho.mean()), "spearman_per_query_min": float(rho.min()),
               "spearman_all_pairs": float(spearman(mat.flatten(), k_scores[kept].flatten())),
               "seconds_ratio_vs_kronfluence": times["total"] / k_times["total"]}
        res["ours"].append(row)
        log(f"ours at rank {rank}: {json.dumps(row)}")
    print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {args.out}")
    return 0


def table(res: dict) -> str:
    i, k = res["info"], res["kronfluence"]["seconds"]
    lines = [f"{i['world']}: {i['parameters']:,} parameters, {i['docs']} documents ({i['corpus_tokens']:,} tokens), "
             f"{i['finetune_examples']} fine-tuning examples, {i['queries']} queries, {i['threads']} threads", "",
             "| run | fit | query | score | total | vs kronfluence | Spearman per query (mean / min) | all pairs |",
             "|---|---|---|---|---|---|---|---|",
             f"| kronfluence {KRONFLUENCE_VERSION} | {k['fit']:.1f} s | | {k['pairwise_scores']:.1f} s (pairwise) | "
             f"{k['total']:.1f} s | 1.00x | | |"]
    for o in res["ours"]:
        s = o["seconds"]
        lines.append(f"| ray-influence, query_rank {o['query_rank']} | {s.get('fit', 0):.1f} s | {s.get('query', 0):.1f} s"
                     f" | {s.get('score', 0):.1f} s | {s['total']:.1f} s | {o['seconds_ratio_vs_kronfluence']:.2f}x | "
                     f"{o['spearman_per_query_mean']:.4f} / {o['spearman_per_query_min']:.4f} | "
                     f"{o['spearman_all_pairs']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
