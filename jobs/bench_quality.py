"""Attribution quality on the synthetic two-stage world: every method, exact and projected, and a sweep.

    .venv/bin/python jobs/bench_quality.py --out docs/bench_quality.json --doc docs/BENCHMARKS.md

Builds (or reuses, under ``--workdir``) the world of the README demo
(:data:`ray_influence.example.DEMO_SPEC`): held-out questions whose answers the fine-tuned
model can only know from pre-training, with the documents that state each answer as
ground truth. Then, in this process and with the library's own functions (the ones the Ray
workers call), it measures MRR and recall@10 against that truth, on all queries and on the
queries the fine-tuned model answers correctly:

  headline  multi_stage, single_stage, grad_dot, grad_cos; exact and projected at each
            ``--dims``; BM25 (bm25s) as a lexical baseline; Spearman of projected vs exact
            scores. At the config defaults (``ray_influence.config``).
  damping   λ_ft x λ_pt over ``--dampings`` (``auto*C`` and fixed values).
  fisher    ``fisher_samples`` x the number of documents behind H_pt (``covariance_max_docs``).
  worlds    the headline methods on worlds of other seeds, previous vs current defaults.
  job       one setting through a real Ray job (``ray_influence.driver.run_job``), compared
            with the in-process numbers.
  lowrank   (``--sections lowrank``) the default exact pass: exact document gradients
            against rank-r truncated SVDs of each module's query vector
            (``ray_influence.lowrank``, ``scoring.query_rank``) for ``--ranks``, beside the
            projected index at ``--lowrank-dims``: MRR and Spearman vs exact, on the demo world
            and ``--world-seeds``. Written to its own section of ``--doc``.

    .venv/bin/python jobs/bench_quality.py --sections lowrank --out docs/bench_lowrank.json --doc docs/BENCHMARKS.md

Every number has its spread over ``--seeds``: each seed is the EK-FAC seed (label sampling
of the true Fisher and the covariance sample) and the projection seed. Per (seed,
fisher_samples, H_pt documents) the factors are fitted once; exact per-document gradients
of the corpus (at θ_pt and θ_ft) and of the queries are taken once per world; each damping,
method and projection is then a preconditioning, a projection (``ray_influence.projection``,
the job's math) and a matmul. Rankings are full (no top-k cut), so MRR is exact.

Prints progress and every measured number; writes JSON (``--out``) and rewrites the
section between ``<!-- bench_quality:start -->`` and ``<!-- bench_quality:end -->`` of
``--doc`` (appended when missing; the rest of the file is left as it is). A benchmark,
not a test: nothing here asserts a quality level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import torch  # noqa: E402

from ray_influence import attribution, lowrank  # noqa: E402
from ray_influence.config import EkfacConfig, ProjectionConfig, config_from_dict  # noqa: E402
from ray_influence.ekfac import Fisher, ihvp, resolve_damping  # noqa: E402
from ray_influence.example import DEMO_SPEC  # noqa: E402
from ray_influence.models import load_model, load_tokenizer  # noqa: E402
from ray_influence.modules import find_tracked_modules  # noqa: E402
from ray_influence.projection import make_projection, project_matrix  # noqa: E402
from ray_influence.scoring import Method, flatten, scores  # noqa: E402
from ray_influence.tokens import tokenize_document, tokenize_prompt_completion  # noqa: E402
from ray_influence.world import (  # noqa: E402
    attribution_metrics,
    build_world,
    job_config,
    random_baseline,
    read_results,
)

K = 10
METHODS = tuple(m.value for m in Method)
PREVIOUS_DEFAULTS = {"damping_ft": "auto", "damping_pt": "auto", "fisher_samples": 1}
"""The config defaults before this benchmark (ekfac.damping: auto, ekfac.fisher_samples: 1)."""
MARK_START, MARK_END = "<!-- bench_quality:start -->", "<!-- bench_quality:end -->"
LOWRANK_MARKS = ("<!-- bench_lowrank:start -->", "<!-- bench_lowrank:end -->")
LOWRANK_COMMAND = ("RAY_AUTH_MODE=disabled .venv/bin/python jobs/bench_quality.py --sections lowrank "
                   "--out docs/bench_lowrank.json --doc docs/BENCHMARKS.md")
COMMAND = ("RAY_AUTH_MODE=disabled .venv/bin/python jobs/bench_quality.py "
           "--out docs/bench_quality.json --doc docs/BENCHMARKS.md")
MAX_TOKENS = 4096  # cluster.max_tokens_per_batch's default
MODULES = (["*"], ["lm_head", "*embed*"])  # modules.include / exclude defaults
WIDE = {"hidden": 128, "layers": 4}
"""The wider worlds of the lowrank section: 4 blocks of width 128 (MLP 512), as a held-out check."""


def current_defaults() -> dict:
    e = EkfacConfig()
    return {"damping_ft": e.damping_for("finetuned"), "damping_pt": e.damping_for("pretrained"),
            "fisher_samples": e.fisher_samples}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--workdir", default="runs/bench_quality", help="where worlds are built and cached")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="EK-FAC (label sampling, covariance sample) and projection seeds")
    p.add_argument("--dims", type=int, nargs="+", default=[0, 16, 32, 64], help="projection dims; 0 = exact")
    p.add_argument("--dampings", nargs="+",
                   default=["auto*0.01", "auto*0.1", "auto", "auto*10", "auto*100", "auto*1000", "0.001", "0.01", "0.1", "1"],
                   help="damping values of the λ_ft x λ_pt grid (each stage); 'auto*C' or a float")
    p.add_argument("--grid-dims", type=int, nargs="+", default=[0, 32, 64], help="projection dims of the damping grid")
    p.add_argument("--fisher-samples", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--pt-docs", type=int, nargs="+", default=[50, 150, 300, 10000],
                   help="documents behind H_pt (a seeded sample, as covariance_max_docs takes it; H_ft keeps "
                        "all its fine-tuning pairs)")
    p.add_argument("--world-seeds", type=int, nargs="*", default=[1, 2],
                   help="further worlds (WorldSpec.seed) for the previous-vs-current-defaults check")
    p.add_argument("--no-job", action="store_true", help="skip the check against a real Ray job")
    p.add_argument("--sections", default="all", choices=["all", "lowrank"],
                   help="all: the sections above; lowrank: only the exact pass at --ranks (its own doc section)")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 0],
                   help="query ranks of the lowrank section (0 = full rank, exact)")
    p.add_argument("--lowrank-dims", type=int, nargs="+", default=[32, 128],
                   help="projection dims shown beside the ranks in the lowrank section")
    p.add_argument("--wide-worlds", type=int, nargs="*", default=[3],
                   help="lowrank section: seeds of wider worlds (hidden 128, 4 blocks, MLP 512) measured too")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--doc", default=None, help="markdown file whose bench_quality section is (re)written")
    return p.parse_args(argv)


def damping_value(spec: str):
    """A --dampings entry as the config takes it: 'auto', 'auto*C' or a float."""
    return spec if spec.startswith("auto") else float(spec)


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ world


class Bench:
    """One world's models, examples, exact gradients and truth, and the fitted factors."""

    def __init__(self, world_seed: int, workdir: str, dtype: torch.dtype = torch.float64, **spec):
        """``spec``: WorldSpec fields replacing the demo world's; ``dtype``: how the corpus gradients are
        held (float64; the defaults sweep holds float32 to halve the wide worlds' memory)."""
        t0 = time.perf_counter()
        self.world = build_world(dataclasses.replace(DEMO_SPEC, seed=world_seed, **spec), workdir, log=log)
        w = self.world
        self.pt, self.ft = load_model(str(w.pretrained_model)), load_model(str(w.finetuned_model))
        tok = load_tokenizer(str(w.pretrained_model))
        length = w.spec.max_length
        # Tokenized exactly as the workers do (ray_influence.worker).
        self.docs = [tokenize_document(tok, str(d["doc_id"]), d["text"], length) for d in w.data.corpus]
        self.ft_examples = [tokenize_prompt_completion(tok, f"ft{i}", r["prompt"], r["completion"], length, add_eos=True)
                            for i, r in enumerate(w.data.finetune)]
        self.queries = [tokenize_prompt_completion(tok, str(q["query_id"]), q["prompt"], q["completion"], length,
                                                   add_eos=False) for q in w.data.queries]
        self.specs = find_tracked_modules(self.pt, *MODULES)
        self.names = list(self.specs)
        self.doc_flat = {}  # [N, D] float64, one stage at a time (the wide worlds hold GBs)
        for stage, model in (("pretrained", self.pt), ("finetuned", self.ft)):
            g = attribution.document_gradients(model, self.docs, self.specs, None, MAX_TOKENS)
            assert len(g.keys) == len(self.docs), "a corpus document was skipped"
            self.doc_flat[stage] = flatten({n: t.to(dtype) for n, t in g.grads.items()}, self.names)
            del g
        # per-module views into the flat rows (one copy of the corpus gradients in memory)
        self.doc_grads = {s: self._module_views(flat) for s, flat in self.doc_flat.items()}
        self.q_grads = attribution.document_gradients(self.ft, self.queries, self.specs, None, MAX_TOKENS).grads
        pos = {d.key: i for i, d in enumerate(self.docs)}
        truth = w.truth["queries"]
        self.qids = [q.key for q in self.queries]
        self.truth_pos = [[pos[str(d)] for d in truth[q]["doc_ids"]] for q in self.qids]
        answered = set(w.stats["answered"])
        self.answered = [q in answered for q in self.qids]
        self._factors: dict = {}
        self._projected: dict = {}
        self.seconds = {"setup": time.perf_counter() - t0, "fit": 0.0}

    def _module_views(self, flat: torch.Tensor) -> dict:
        """``{name: [N, d_out, d_in']}`` views of flat rows ``[N, D]`` (modules in ``names`` order)."""
        out, start = {}, 0
        for n in self.names:
            r, c = self.specs[n].shape
            out[n] = flat[:, start:start + r * c].unflatten(1, (r, c))
            start += r * c
        return out

    @property
    def size(self) -> dict:
        s = self.world.stats
        return {"world_seed": self.world.spec.seed, "key": self.world.spec.key, "docs": s["docs"],
                "fact_docs": s["fact_docs"], "distractors": s["distractors"], "facts": s["facts"],
                "finetune_pairs": s["finetune_pairs"], "queries": s["queries"],
                "answered": sum(self.answered), "parameters": s["parameters"], "vocab_size": s["vocab_size"],
                "memorisation": s["memorisation"], "qa_heldout": s["qa_heldout"],
                "tracked_modules": len(self.names), "gradient_width": int(self.doc_flat["pretrained"].shape[1])}

    def factors(self, seed: int, samples: int, pt_docs: int, fisher: Fisher = Fisher.TRUE) -> tuple[dict, dict]:
        """(H_ft, H_pt) factors with 'auto' damping; H_pt on a seeded sample of ``pt_docs`` documents,
        drawn as the driver draws it (``Job._shares``). ``samples`` is ignored by the empirical Fisher."""
        samples = samples if fisher is Fisher.TRUE else 1
        n_pt = min(pt_docs, len(self.docs))
        # the seed draws the labels of the true Fisher and the H_pt sample: without either, one fit serves every seed
        key = (seed if fisher is Fisher.TRUE or n_pt < len(self.docs) else None, samples, n_pt, fisher)
        if key not in self._factors:
            t0 = time.perf_counter()
            rng = random.Random(f"{seed}:pretrained")
            rows = sorted(rng.sample(range(len(self.docs)), key[2]))
            fpt = attribution.fit_factors(self.pt, [self.docs[i] for i in rows], self.specs, fisher,
                                          samples, seed, "auto", MAX_TOKENS)
            fft = attribution.fit_factors(self.ft, self.ft_examples, self.specs, fisher, samples, seed, "auto",
                                          MAX_TOKENS)
            self._factors[key] = (fft, fpt)
            self.seconds["fit"] += time.perf_counter() - t0
        return self._factors[key]

    def projected_docs(self, stage: str, dim: int, seed: int) -> torch.Tensor:
        """``[N, sum_m k^2]`` projected document gradients (P_out DW P_in^T per module)."""
        key = (stage, dim, seed)
        if key not in self._projected:
            if len(self._projected) > 8:  # one seed's worth at a time
                self._projected.clear()
            projs = self.projections(dim, seed)
            self._projected[key] = flatten({n: project_matrix(g, projs[n]) for n, g in self.doc_grads[stage].items()},
                                           self.names)
        return self._projected[key]

    def projections(self, dim: int, seed: int) -> dict:
        return {n: make_projection(s, dim, seed) for n, s in self.specs.items()}

    def score(self, method: Method, u: dict, dim: int, seed: int) -> torch.Tensor:
        """``[Q, N]`` scores of full-space query vectors ``u`` (projected to ``dim`` when > 0)."""
        if dim == 0:
            return scores(flatten(u, self.names), self.doc_flat[method.doc_model], cosine=method.cosine)
        projs = self.projections(dim, seed)
        uq = flatten({n: project_matrix(u[n], projs[n]) for n in self.names}, self.names)
        return scores(uq, self.projected_docs(method.doc_model, dim, seed), cosine=method.cosine)

    def metrics(self, s: torch.Tensor) -> dict:
        """MRR and recall@K on all queries and on the answered ones, from full rankings.

        Ties go to the lower corpus position, as ``ray_influence.scoring.top_k`` breaks them.
        """
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(1, s.shape[1] + 1).expand_as(order))
        rr, rec = [], []
        for q, t in enumerate(self.truth_pos):
            r = rank[q, t]
            rr.append(1.0 / float(r.min()))
            rec.append(float((r <= K).double().mean()))
        ans = [i for i, a in enumerate(self.answered) if a]
        return {"all": {"mrr": statistics.fmean(rr), "recall": statistics.fmean(rec)},
                "answered": {"mrr": statistics.fmean([rr[i] for i in ans]), "recall": statistics.fmean([rec[i] for i in ans])}}


def with_damping(factors: dict, spec) -> dict:
    """The factors with their damping resolved from ``spec`` ('auto', 'auto*C' or a float)."""
    return {n: dataclasses.replace(f, damping=resolve_damping(f.lam, spec)) for n, f in factors.items()}


def precondition(method: Method, g: dict, fft: dict | None, fpt: dict | None) -> dict:
    """The method's full-space query vectors (``ray_influence.scoring.query_vectors``, written out
    so that the fine-tuning inverse can be shared across λ_pt values)."""
    if method in (Method.GRAD_DOT, Method.GRAD_COS):
        return {n: t.to(torch.float64) for n, t in g.items()}
    u = {n: ihvp(t, fft[n]) for n, t in g.items()}
    return u if method is Method.SINGLE_STAGE else {n: ihvp(t, fpt[n]) for n, t in u.items()}


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Spearman correlation of ``a[i]`` and ``b[i]``."""
    def ranks(x):
        return torch.argsort(torch.argsort(x, dim=1), dim=1).to(torch.float64)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean())


def agg(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def agg_metrics(per_seed: list[dict]) -> dict:
    return {sub: {m: agg([r[sub][m] for r in per_seed]) for m in ("mrr", "recall")} for sub in ("all", "answered")}


# --------------------------------------------------------------------------- sections


def setting_label(st: dict) -> str:
    return f"λ_ft {st['damping_ft']}, λ_pt {st['damping_pt']}, fisher_samples {st['fisher_samples']}"


def methods_table(bench: Bench, setting: dict, seeds, dims, methods=METHODS, spearman: bool = True) -> dict:
    """``{method: {dim: {metrics..., spearman}}}`` over seeds at one setting (all H_pt documents)."""
    out = {m: {d: [] for d in dims} for m in methods}
    rho = {m: {d: [] for d in dims if d} for m in methods}
    for seed in seeds:
        fft, fpt = bench.factors(seed, setting["fisher_samples"], 10**9)
        fft, fpt = with_damping(fft, setting["damping_ft"]), with_damping(fpt, setting["damping_pt"])
        for m in methods:
            method = Method.parse(m)
            u = precondition(method, bench.q_grads, fft, fpt)
            exact = bench.score(method, u, 0, seed)
            for d in dims:
                s = exact if d == 0 else bench.score(method, u, d, seed)
                out[m][d].append(bench.metrics(s))
                if d and spearman:
                    rho[m][d].append(spearman_rows(s, exact))
    res = {m: {str(d): agg_metrics(out[m][d]) for d in dims} for m in methods}
    if spearman:
        for m in methods:
            for d in rho[m]:
                res[m][str(d)]["spearman"] = agg(rho[m][d])
    return res


def lowrank_scores(bench: Bench, method: Method, u: dict, rank: int) -> torch.Tensor:
    """``[Q, N]`` exact-pass scores: every module's ``u`` cut to rank ``rank`` (``lowrank.truncate``,
    the job's math), against the exact document gradients. Cosine scores keep the full query norm."""
    u_r = {n: lowrank.dense(lowrank.truncate(u[n], rank)) for n in bench.names}
    s = scores(flatten(u_r, bench.names), bench.doc_flat[method.doc_model])
    if method.cosine:
        qn = flatten(u, bench.names).to(torch.float64).norm(dim=1)
        dn = bench.doc_flat[method.doc_model].norm(dim=1)
        s = s / (qn[:, None] * dn[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    return s


def lowrank_table(bench: Bench, setting: dict, seeds, ranks, dims, methods=METHODS) -> dict:
    """``{method: {"exact": metrics, "r<rank>": {metrics, spearman, energy}, "k<dim>": {metrics, spearman}}}``."""
    cells: dict = {m: defaultdict(list) for m in methods}
    for seed in seeds:
        fft, fpt = bench.factors(seed, setting["fisher_samples"], 10**9)
        fft, fpt = with_damping(fft, setting["damping_ft"]), with_damping(fpt, setting["damping_pt"])
        for m in methods:
            method = Method.parse(m)
            u = precondition(method, bench.q_grads, fft, fpt)
            exact = bench.score(method, u, 0, seed)
            cells[m]["exact"].append({**bench.metrics(exact), "spearman": 1.0})
            for r in ranks:
                s = lowrank_scores(bench, method, u, r)
                kept = sum(lowrank.truncate(u[n], r).kept for n in bench.names)
                total = sum(u[n].flatten(1).square().sum(1) for n in bench.names)
                cells[m][f"r{r}"].append({**bench.metrics(s), "spearman": spearman_rows(s, exact),
                                          "energy": float((kept / total).min())})
            for d in dims:
                s = bench.score(method, u, d, seed)
                cells[m][f"k{d}"].append({**bench.metrics(s), "spearman": spearman_rows(s, exact)})
    out = {}
    for m in methods:
        out[m] = {}
        for col, per_seed in cells[m].items():
            cell = agg_metrics(per_seed)
            cell["spearman"] = agg([c["spearman"] for c in per_seed])
            if "energy" in per_seed[0]:
                cell["energy_min"] = agg([c["energy"] for c in per_seed])
            out[m][col] = cell
    return out


def render_lowrank(res: dict) -> str:
    start, end = LOWRANK_MARKS
    ranks, dims = res["args"]["ranks"], res["args"]["lowrank_dims"]
    cols = [f"r{r}" for r in ranks] + [f"k{d}" for d in dims]
    names = {**{f"r{r}": (f"rank {r}" if r else "full rank") for r in ranks}, **{f"k{d}": f"projected k={d}" for d in dims}}
    L = [start, "", f"Measured with `{LOWRANK_COMMAND}` ({res['seconds']:.0f} s, {res['when']}).", "",
         f"Setting: the config defaults ({setting_label(res['current'])}), seeds {res['args']['seeds']}. "
         "Exact: every pair scored with the full preconditioned query; rank r: each module's query cut to its "
         "rank-r SVD (`scoring.mode: exact`, `scoring.query_rank: r`); projected: the index at k (`scoring.mode: "
         "index`). Spearman is against exact, per query, over the whole corpus; MRR on all queries. "
         "Mean ± sd over seeds.", ""]
    for ws, per in res["lowrank"].items():
        size = next(w for w in res["worlds"] if w["name"] == ws)
        L += [f"**World {ws}** ({size['docs']} documents, {size['queries']} queries, {size['parameters']:,} "
              f"parameters, {size['tracked_modules']} modules, gradient width {size['gradient_width']:,}):", "",
              "| method | measure | exact | " + " | ".join(names[c] for c in cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
        for m, row in per.items():
            L.append(f"| {m} | Spearman vs exact | 1 | " + " | ".join(pm(row[c]["spearman"]) for c in cols) + " |")
            L.append(f"| {m} | MRR | {pm(row['exact']['all']['mrr'])} | "
                     + " | ".join(pm(row[c]["all"]["mrr"]) for c in cols) + " |")
            L.append(f"| {m} | min energy kept | 1 | " + " | ".join(
                pm(row[c]["energy_min"]) if "energy_min" in row[c] else "" for c in cols) + " |")
        L.append("")
    L += ["Raw numbers: `docs/bench_lowrank.json`.", "", end]
    return "\n".join(L)


def main_lowrank(args) -> int:
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    current = current_defaults()
    res: dict = {"args": vars(args), "current": current, "worlds": [], "lowrank": {},
                 "when": time.strftime("%Y-%m-%d"), "versions": {"torch": torch.__version__}}
    worlds = [(str(ws), ws, {}) for ws in [0] + list(args.world_seeds)]
    worlds += [(f"{ws}-wide", ws, WIDE) for ws in args.wide_worlds]
    for name, ws, spec in worlds:
        b = Bench(ws, args.workdir, **spec)
        res["worlds"].append({**b.size, "name": name})
        res["lowrank"][name] = lowrank_table(b, current, args.seeds, args.ranks, args.lowrank_dims)
        for m, row in res["lowrank"][name].items():
            log(f"  world {name} {m:<13} MRR exact {pm(row['exact']['all']['mrr'])}  " + "  ".join(
                f"{c} MRR {pm(cell['all']['mrr'])} rho {pm(cell['spearman'])}" for c, cell in row.items() if c != "exact"))
    res["seconds"] = time.perf_counter() - t_start
    log(f"done in {res['seconds']:.0f}s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    if args.doc:
        write_doc_section(args.doc, render_lowrank(res), LOWRANK_MARKS,
                          "## Exact pass against low-rank queries (`jobs/bench_quality.py --sections lowrank`)")
    return 0


def bm25_rows(bench: Bench) -> dict:
    """BM25 (bm25s, English stopwords, k1=1.5, b=0.75) over the corpus texts: the query as
    prompt + completion (the text the influence is computed on) and as the prompt alone."""
    import bm25s
    import numpy as np

    texts = [d["text"] for d in bench.world.data.corpus]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    out = {}
    for name, make in (("bm25 (prompt + completion)", lambda q: q["prompt"] + q["completion"]),
                       ("bm25 (prompt only)", lambda q: q["prompt"])):
        qs = bm25s.tokenize([make(q) for q in bench.world.data.queries], stopwords="en", return_ids=False,
                            show_progress=False)
        s = torch.from_numpy(np.stack([retriever.get_scores(t) for t in qs]).astype("float64"))
        out[name] = agg_metrics([bench.metrics(s)])
    return out


def random_row(bench: Bench) -> dict:
    w = bench.world
    ans = {q: t for q, t in w.truth["queries"].items() if q in set(w.stats["answered"])}
    r_all, r_ans = random_baseline(w.truth, len(w.data.corpus), K), random_baseline(ans, len(w.data.corpus), K)
    return {sub: {"mrr": agg([r["mrr"]]), "recall": agg([r[f"recall@{K}"]])}
            for sub, r in (("all", r_all), ("answered", r_ans))}


def damping_grid(bench: Bench, args, fisher_samples: int) -> dict:
    """multi_stage over λ_ft x λ_pt and single_stage over λ_ft, at each --grid-dims."""
    multi = {(a, b): {d: [] for d in args.grid_dims} for a in args.dampings for b in args.dampings}
    single = {a: {d: [] for d in args.grid_dims} for a in args.dampings}
    for seed in args.seeds:
        t0 = time.perf_counter()
        fft0, fpt0 = bench.factors(seed, fisher_samples, 10**9)
        fpts = {b: with_damping(fpt0, damping_value(b)) for b in args.dampings}
        for a in args.dampings:
            fft = with_damping(fft0, damping_value(a))
            uf = precondition(Method.SINGLE_STAGE, bench.q_grads, fft, None)
            for d in args.grid_dims:
                single[a][d].append(bench.metrics(bench.score(Method.SINGLE_STAGE, uf, d, seed)))
            for b in args.dampings:
                u = {n: ihvp(t, fpts[b][n]) for n, t in uf.items()}
                for d in args.grid_dims:
                    multi[a, b][d].append(bench.metrics(bench.score(Method.MULTI_STAGE, u, d, seed)))
        log(f"  damping grid, seed {seed}: {time.perf_counter() - t0:.0f}s")
    return {"dampings": args.dampings, "dims": args.grid_dims, "fisher_samples": fisher_samples,
            "multi_stage": {f"{a}|{b}": {str(d): agg_metrics(v) for d, v in per.items()} for (a, b), per in multi.items()},
            "single_stage": {a: {str(d): agg_metrics(v) for d, v in per.items()} for a, per in single.items()}}


def fisher_grid(bench: Bench, args, settings: dict[str, dict], dims=(0, 32)) -> dict:
    """multi_stage over fisher_samples x H_pt documents (and single_stage over fisher_samples)."""
    out: dict = {}
    for name, st in settings.items():
        for fs in args.fisher_samples:
            for n_pt in args.pt_docs:
                per = {d: [] for d in dims}
                single = {d: [] for d in dims}
                for seed in args.seeds:
                    fft, fpt = bench.factors(seed, fs, n_pt)
                    fft, fpt = with_damping(fft, st["damping_ft"]), with_damping(fpt, st["damping_pt"])
                    u = precondition(Method.MULTI_STAGE, bench.q_grads, fft, fpt)
                    uf = precondition(Method.SINGLE_STAGE, bench.q_grads, fft, None)
                    for d in dims:
                        per[d].append(bench.metrics(bench.score(Method.MULTI_STAGE, u, d, seed)))
                        single[d].append(bench.metrics(bench.score(Method.SINGLE_STAGE, uf, d, seed)))
                n_docs = min(n_pt, len(bench.docs))
                out[f"{name}|{fs}|{n_docs}"] = {
                    "setting": name, "fisher_samples": fs, "pt_docs": n_docs,
                    "multi_stage": {str(d): agg_metrics(v) for d, v in per.items()},
                    "single_stage": {str(d): agg_metrics(v) for d, v in single.items()}}
            log(f"  fisher grid [{name}] fisher_samples {fs}: done ({bench.seconds['fit']:.0f}s fitting so far)")
    return out


def diagnostics(bench: Bench, setting: dict, seed: int) -> dict:
    """What explains the numbers: how far fine-tuning moved, how the doc gradients moved, and how
    aligned each method's query vector is with the truth documents' gradients."""
    p0 = torch.cat([p.detach().flatten() for p in bench.pt.parameters()]).double()
    p1 = torch.cat([p.detach().flatten() for p in bench.ft.parameters()]).double()
    truth = sorted({t for ts in bench.truth_pos for t in ts})
    dpt, dft = bench.doc_flat["pretrained"][truth], bench.doc_flat["finetuned"][truth]
    doc_cos = torch.nn.functional.cosine_similarity(dpt, dft, dim=1)
    fft, fpt = bench.factors(seed, setting["fisher_samples"], 10**9)
    fft, fpt = with_damping(fft, setting["damping_ft"]), with_damping(fpt, setting["damping_pt"])
    align, noise = {}, {}
    for m in (Method.MULTI_STAGE, Method.SINGLE_STAGE, Method.GRAD_DOT):
        u = flatten(precondition(m, bench.q_grads, fft, fpt), bench.names)
        d = bench.doc_flat[m.doc_model]
        cos = [abs(float(torch.nn.functional.cosine_similarity(u[q], d[t], dim=0)))
               for q, ts in enumerate(bench.truth_pos) for t in ts]
        align[m.value] = statistics.median(cos)
        # The projection's error on a (query, document) pair, in units of ‖u‖‖∇L(z)‖: the same
        # scale for every method; only the signal (the alignment above) differs.
        un, dn = u.norm(dim=1), d.norm(dim=1)
        for k in (16, 32, 64):
            err = (bench.score(m, precondition(m, bench.q_grads, fft, fpt), k, seed) - u @ d.T) / (un[:, None] * dn[None, :])
            noise.setdefault(m.value, {})[str(k)] = float(err.abs().median())
    return {"relative_parameter_change": float((p1 - p0).norm() / p0.norm()),
            "truth_doc_gradient_cos_pt_vs_ft_median": float(doc_cos.median()),
            "query_truth_doc_abs_cos_median": align, "projection_error_median": noise, "seed": seed, "setting": setting}


def job_check(bench: Bench, setting: dict, dim: int, seed: int, workdir: str) -> dict:
    """The whole job on local Ray at one setting, against the in-process path (top-50 metrics, scores)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    damping = {"finetuned": setting["damping_ft"], "pretrained": setting["damping_pt"]}
    run_dir = tempfile.mkdtemp(prefix="job-", dir=os.path.abspath(workdir))
    top = 50
    cfg_dict = job_config(bench.world, run_dir, projection={"dim": dim, "seed": seed},
                          ekfac={"fisher": True, "fisher_samples": setting["fisher_samples"],
                                 "covariance_max_docs": EkfacConfig().covariance_max_docs, "damping": damping,
                                 "seed": seed},
                          scoring={"methods": list(METHODS), "top_k": top, "token_influence_top": 0},
                          cluster={"replicas": 1, "num_cpus_per_worker": 1})
    cfg = config_from_dict(cfg_dict)
    from ray_influence.driver import run_job

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    t0 = time.perf_counter()
    try:
        run_job(cfg, progress=False)
    finally:
        ray.shutdown()
    seconds = time.perf_counter() - t0
    rows = read_results(cfg.run_dir)
    job = attribution_metrics(rows, bench.world.truth, K)
    fft, fpt = bench.factors(seed, setting["fisher_samples"], 10**9)
    fft, fpt = with_damping(fft, setting["damping_ft"]), with_damping(fpt, setting["damping_pt"])
    pos = {d.key: i for i, d in enumerate(bench.docs)}
    qpos = {q: i for i, q in enumerate(bench.qids)}
    out = {"dim": dim, "seed": seed, "setting": setting, "top_k": top, "job_seconds": seconds, "methods": {}}
    for m in METHODS:
        method = Method.parse(m)
        s = bench.score(method, precondition(method, bench.q_grads, fft, fpt), dim, seed)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :top]
        mine = [{"query_id": bench.qids[q], "rank": r + 1, "doc_id": bench.docs[j].key}
                for q in range(len(bench.qids)) for r, j in enumerate(order[q].tolist())]
        here = attribution_metrics(mine, bench.world.truth, K)[""]
        job_rows = [r for r in rows if r["method"] == m]
        rel = max(abs(r["score"] - float(s[qpos[str(r["query_id"])], pos[str(r["doc_id"])]]))
                  / float(s[qpos[str(r["query_id"])]].abs().max()) for r in job_rows)
        top10_job = {(str(r["query_id"]), str(r["doc_id"])) for r in job_rows if r["rank"] <= K}
        top10_here = {(r["query_id"], r["doc_id"]) for r in mine if r["rank"] <= K}
        out["methods"][m] = {
            "job": {"mrr": job[m]["mrr"], "recall": job[m][f"recall@{K}"]},
            "in_process": {"mrr": here["mrr"], "recall": here[f"recall@{K}"]},
            "max_score_diff_rel_to_row_max": rel,
            "top10_overlap": len(top10_job & top10_here) / max(1, len(top10_here))}
        log(f"  job vs in-process, {m}: recall@10 {out['methods'][m]['job']['recall']:.4f} vs "
            f"{out['methods'][m]['in_process']['recall']:.4f}, MRR@50 {out['methods'][m]['job']['mrr']:.4f} vs "
            f"{out['methods'][m]['in_process']['mrr']:.4f}, max score diff {rel:.1e} (of the row max), "
            f"top-10 overlap {out['methods'][m]['top10_overlap']:.3f}")
    return out


# ---------------------------------------------------------------------------- markdown


def pm(a: dict, digits: int = 3) -> str:
    return f"{a['mean']:.{digits}f} ± {a['sd']:.{digits}f}"


def dim_name(d) -> str:
    return "exact" if str(d) == "0" else f"k={d}"


def render(res: dict) -> str:
    h = res["headline"]
    w = res["worlds"][0]
    L = [MARK_START, "", "Regenerate (about %d minutes on one core of the development machine):" % max(1, round(res["seconds"] / 60)),
         "", f"    {COMMAND}", ""]
    L += [f"World: the README demo world (`ray_influence.example.DEMO_SPEC`, world seed {w['world_seed']}): "
          f"{w['docs']} pre-training documents ({w['fact_docs']} state one of {w['facts']} facts, "
          f"{w['distractors']} distractors), {w['finetune_pairs']} fine-tuning QA pairs, {w['queries']} held-out "
          f"queries, of which the fine-tuned model answers {w['answered']} correctly. GPT-NeoX of "
          f"{w['parameters']:,} parameters, {w['tracked_modules']} tracked modules, exact gradient width "
          f"{w['gradient_width']:,}. Memorisation {w['memorisation']:.0%}, held-out QA {w['qa_heldout']:.1%}.",
          "",
          f"Every cell is mean ± sample standard deviation over seeds {res['args']['seeds']} (each seed is the "
          "EK-FAC seed, i.e. the true-Fisher label sampling and the covariance sample, and the projection seed). "
          "Rankings are full, so MRR is exact (the demo's top-50 MRR is a lower bound). Recall is recall@10. "
          "\"answered\": the queries the fine-tuned model answers correctly; \"all\": every held-out query. "
          f"Computed in process with the library's functions; torch {res['versions']['torch']}, 1 thread.", ""]
    L += [f"### Methods at the config defaults ({setting_label(res['current'])}, H_pt on all documents)", "",
          "| method | index | MRR answered | recall answered | MRR all | recall all | Spearman vs exact |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        for d, cell in h[m].items():
            sp = pm(cell["spearman"]) if "spearman" in cell else "—"
            L.append(f"| {m} | {dim_name(d)} | {pm(cell['answered']['mrr'])} | {pm(cell['answered']['recall'])} | "
                     f"{pm(cell['all']['mrr'])} | {pm(cell['all']['recall'])} | {sp} |")
    for name, cell in {**res["bm25"], "random ranking (expectation)": res["random"]}.items():
        L.append(f"| {name} | — | {cell['answered']['mrr']['mean']:.3f} | {cell['answered']['recall']['mean']:.3f} | "
                 f"{cell['all']['mrr']['mean']:.3f} | {cell['all']['recall']['mean']:.3f} | — |")
    L += ["", "BM25 and the random ranking have no seed (deterministic / an expectation). Spearman: per query, over "
          "all documents, projected vs exact scores of the same method and seed, averaged over queries.", ""]

    g = res["damping_grid"]
    for d in g["dims"]:
        L += [f"### Damping grid: multi_stage recall@10 (all queries), {dim_name(d)}, fisher_samples "
              f"{g['fisher_samples']}", "", "rows λ_ft, columns λ_pt; `auto` = 0.1 × mean Λ per module, "
              "`auto*C` = C × that.", "",
              "| λ_ft \\ λ_pt | " + " | ".join(g["dampings"]) + " |", "|---|" + "---:|" * len(g["dampings"])]
        for a in g["dampings"]:
            L.append(f"| {a} | " + " | ".join(pm(g["multi_stage"][f"{a}|{b}"][str(d)]["all"]["recall"], 2)
                                              for b in g["dampings"]) + " |")
        L.append("")
    L += ["### Damping grid: single_stage recall@10 (all queries) over λ_ft", "",
          "| λ_ft | " + " | ".join(dim_name(d) for d in g["dims"]) + " |", "|---|" + "---:|" * len(g["dims"])]
    for a in g["dampings"]:
        L.append(f"| {a} | " + " | ".join(pm(g["single_stage"][a][str(d)]["all"]["recall"]) for d in g["dims"]) + " |")
    L += ["", "The best cells of the multi_stage grid (recall@10, all queries):", ""]
    for d in g["dims"]:
        best = max(g["multi_stage"].items(), key=lambda kv: kv[1][str(d)]["all"]["recall"]["mean"])
        a, b = best[0].split("|")
        L.append(f"- {dim_name(d)}: λ_ft {a}, λ_pt {b}: {pm(best[1][str(d)]['all']['recall'])} "
                 f"(MRR {pm(best[1][str(d)]['all']['mrr'])})")
    L.append("")

    f = res["fisher_grid"]
    names = list(dict.fromkeys(v["setting"] for v in f.values()))
    L += ["### fisher_samples × documents behind H_pt (recall@10, all queries)", "",
          "H_pt is fitted on a seeded sample of that many corpus documents (as `covariance_max_docs` draws it); "
          "H_ft keeps all its fine-tuning pairs. single_stage does not use H_pt, so its column repeats over "
          "the H_pt sizes. Settings: " + "; ".join(f"**{n}**: {setting_label(res['settings'][n])}" for n in names)
          + ".", "",
          "| setting | fisher_samples | H_pt docs | multi exact | multi k=32 | single exact | single k=32 |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for v in f.values():
        L.append(f"| {v['setting']} | {v['fisher_samples']} | {v['pt_docs']} | "
                 f"{pm(v['multi_stage']['0']['all']['recall'])} | {pm(v['multi_stage']['32']['all']['recall'])} | "
                 f"{pm(v['single_stage']['0']['all']['recall'])} | {pm(v['single_stage']['32']['all']['recall'])} |")
    L.append("")

    wv = res["world_check"]
    L += ["### Other worlds: previous vs current defaults (recall@10, all queries)", "",
          "Worlds of other seeds (same sizes; different entities, facts, documents and trained models). "
          "previous: " + setting_label(PREVIOUS_DEFAULTS) + "; current: " + setting_label(res["current"]) + ".", "",
          "| world seed | setting | " + " | ".join(f"{m} {dim_name(d)}" for m in ("multi_stage", "single_stage")
                                                  for d in (0, 32)) + " |",
          "|---:|---|" + "---:|" * 4]
    for ws, per in wv.items():
        for name, tab in per.items():
            L.append(f"| {ws} | {name} | " + " | ".join(pm(tab[m][str(d)]["all"]["recall"])
                                                       for m in ("multi_stage", "single_stage") for d in (0, 32)) + " |")
    L.append("")

    dg = res["diagnostics"]
    L += ["### Diagnostics (world seed 0, current defaults, seed %d)" % dg["seed"], "",
          f"- fine-tuning moved the parameters by {dg['relative_parameter_change']:.1%} of their norm "
          f"(‖θ_ft − θ_pt‖ / ‖θ_pt‖);",
          f"- a truth document's gradient at θ_pt vs at θ_ft: median cosine "
          f"{dg['truth_doc_gradient_cos_pt_vs_ft_median']:.3f};",
          "- median |cos(u, ∇L(z))| of a query vector with its truth documents' gradients (the random "
          "projection's error is of the order of ‖u‖‖∇L(z)‖/√k, so this is what it is compared against): "
          + ", ".join(f"{m} {v:.1e}" for m, v in dg["query_truth_doc_abs_cos_median"].items()) + ";",
          "- the projection's error |⟨û, Ĝ⟩ − ⟨u, ∇L(z)⟩| / (‖u‖‖∇L(z)‖), median over every (query, document) "
          "pair: " + "; ".join(f"{m} " + ", ".join(f"k={k} {v:.1e}" for k, v in per.items())
                               for m, per in dg["projection_error_median"].items()) + ".", ""]

    if res.get("job"):
        j = res["job"]
        L += [f"### Check against a real Ray job ({dim_name(j['dim'])}, seed {j['seed']}, {setting_label(j['setting'])})",
              "", f"`ray_influence.driver.run_job` on local Ray (1 replica, {j['job_seconds']:.0f}s), top {j['top_k']}, "
              "against the in-process path of this benchmark cut to the same top 50:", "",
              "| method | recall@10 job | recall@10 here | MRR@50 job | MRR@50 here | max score diff / row max | top-10 overlap |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for m, v in j["methods"].items():
            L.append(f"| {m} | {v['job']['recall']:.4f} | {v['in_process']['recall']:.4f} | {v['job']['mrr']:.4f} | "
                     f"{v['in_process']['mrr']:.4f} | {v['max_score_diff_rel_to_row_max']:.1e} | {v['top10_overlap']:.3f} |")
        L.append("")
    L += ["Raw numbers, per seed: `docs/bench_quality.json`.", "", MARK_END]
    return "\n".join(L)


def write_doc_section(path: str, section: str, marks: tuple[str, str], title: str = "") -> None:
    """Replaces the part of the markdown file ``path`` from ``marks[0]`` to ``marks[1]`` with ``section``
    (which starts and ends with those marks); appends it, under ``title``, when the file has none."""
    p = Path(path)
    start, end = marks
    text = p.read_text() if p.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{section}\n"
    p.write_text(text)


# --------------------------------------------------------------------------------- main


def main(args) -> int:
    if args.sections == "lowrank":
        return main_lowrank(args)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    current = current_defaults()
    settings = {"previous": PREVIOUS_DEFAULTS, "current": current}
    if PREVIOUS_DEFAULTS == current:
        settings = {"current": current}
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    log(f"current defaults: {setting_label(current)}; projection.dim default {ProjectionConfig().dim}")

    bench = Bench(0, args.workdir)
    log(f"world 0: {bench.size}")
    res: dict = {"args": vars(args), "current": current, "previous": PREVIOUS_DEFAULTS, "settings": settings,
                 "versions": {"torch": torch.__version__, "python": platform.python_version()},
                 "worlds": [bench.size]}

    log("headline: every method, exact and projected")
    t0 = time.perf_counter()
    res["headline"] = methods_table(bench, current, args.seeds, args.dims)
    for m in METHODS:
        for d, cell in res["headline"][m].items():
            sp = f", Spearman {pm(cell['spearman'])}" if "spearman" in cell else ""
            log(f"  {m:<13} {dim_name(d):<6} recall@10 all {pm(cell['all']['recall'])}  answered "
                f"{pm(cell['answered']['recall'])}  MRR all {pm(cell['all']['mrr'])}  answered "
                f"{pm(cell['answered']['mrr'])}{sp}")
    res["bm25"] = bm25_rows(bench)
    res["random"] = random_row(bench)
    for name, cell in {**res["bm25"], "random": res["random"]}.items():
        log(f"  {name:<28} recall@10 all {cell['all']['recall']['mean']:.3f}  answered "
            f"{cell['answered']['recall']['mean']:.3f}  MRR all {cell['all']['mrr']['mean']:.3f}")
    log(f"  ({time.perf_counter() - t0:.0f}s)")

    # The fast metric above agrees with the library's attribution_metrics (first seed, exact multi_stage).
    fft, fpt = bench.factors(args.seeds[0], current["fisher_samples"], 10**9)
    s = bench.score(Method.MULTI_STAGE, precondition(Method.MULTI_STAGE, bench.q_grads, with_damping(fft, current["damping_ft"]),
                                                     with_damping(fpt, current["damping_pt"])), 0, args.seeds[0])
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rows = [{"query_id": bench.qids[q], "rank": r + 1, "doc_id": bench.docs[j].key}
            for q in range(len(bench.qids)) for r, j in enumerate(order[q].tolist())]
    lib = attribution_metrics(rows, bench.world.truth, K)[""]
    fast = bench.metrics(s)["all"]
    assert math.isclose(lib["mrr"], fast["mrr"]) and math.isclose(lib[f"recall@{K}"], fast["recall"]), (lib, fast)

    log("damping grid")
    res["damping_grid"] = damping_grid(bench, args, current["fisher_samples"])
    for d in args.grid_dims:
        best = max(res["damping_grid"]["multi_stage"].items(), key=lambda kv: kv[1][str(d)]["all"]["recall"]["mean"])
        log(f"  best multi_stage {dim_name(d)}: {best[0]} recall@10 {pm(best[1][str(d)]['all']['recall'])}")

    log("fisher_samples x H_pt documents")
    res["fisher_grid"] = fisher_grid(bench, args, settings)
    for v in res["fisher_grid"].values():
        log(f"  {v['setting']:<8} fs {v['fisher_samples']:>2} H_pt docs {v['pt_docs']:>4}: multi exact "
            f"{pm(v['multi_stage']['0']['all']['recall'])} k=32 {pm(v['multi_stage']['32']['all']['recall'])}; "
            f"single exact {pm(v['single_stage']['0']['all']['recall'])}")

    res["diagnostics"] = diagnostics(bench, current, args.seeds[0])
    log(f"diagnostics: {json.dumps(res['diagnostics'])}")

    log("other worlds: previous vs current defaults")
    res["world_check"] = {}
    for ws in [0] + list(args.world_seeds):
        b = bench if ws == 0 else Bench(ws, args.workdir)
        if ws:
            res["worlds"].append(b.size)
        res["world_check"][str(ws)] = {name: methods_table(b, st, args.seeds, (0, 32), ("multi_stage", "single_stage"),
                                                           spearman=False) for name, st in settings.items()}
        for name, tab in res["world_check"][str(ws)].items():
            log(f"  world {ws} {name:<8} " + "  ".join(f"{m} {dim_name(d)} {pm(tab[m][str(d)]['all']['recall'])}"
                                                       for m in ("multi_stage", "single_stage") for d in (0, 32)))

    if not args.no_job:
        log("a real Ray job at the current defaults, k=32, seed %d" % args.seeds[0])
        res["job"] = job_check(bench, current, 32, args.seeds[0], args.workdir)

    res["seconds"] = time.perf_counter() - t_start
    log(f"done in {res['seconds']:.0f}s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {args.out}")
    if args.doc:
        write_doc_section(args.doc, render(res), (MARK_START, MARK_END),
                          "## Attribution quality (`jobs/bench_quality.py`)")
        log(f"wrote the bench_quality section of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
