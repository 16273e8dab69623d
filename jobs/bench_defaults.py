"""The config defaults, chosen on the default (exact) scoring path over a family of worlds, with held-out worlds.

    RAY_AUTH_MODE=disabled .venv/bin/python jobs/bench_defaults.py --out docs/bench_defaults.json --doc docs/BENCHMARKS.md

Builds (or reuses, under ``--workdir``) every world of
:data:`ray_influence.world.WORLD_FAMILY`: the demo world and worlds that vary it along
one axis each (seed, a byte-level BPE tokenizer, fine-tuning length and learning rate,
the share of hard distractors, width 128 x 4 blocks), which the defaults are chosen on,
and two held-out worlds that vary several axes at once, which are only reported.

Per world and EK-FAC seed (``--seeds``: label sampling of the true Fisher and the H_pt
sample), with the library's own functions (those the Ray workers call), it fits the
factors once per Fisher type x ``fisher_samples`` x H_pt sample size, and scores the
exact per-document gradients against every λ_ft x λ_pt (``--dampings``) of multi_stage
and every λ_ft of single_stage. Exact scores are the default path's to within its
measured fidelity (rank 16: Spearman >= 0.993 vs exact, section "Exact scoring" of
docs/BENCHMARKS.md); the chosen setting is also run at rank 16 (``lowrank.truncate``).

The rule (written into the doc with the numbers): on the tuning worlds, each setting's
answered-query MRR is divided by that world's best, for multi_stage at (λ_ft, λ_pt) and
single_stage at λ_ft (they share ``ekfac.damping.finetuned`` and the Fisher settings);
the default is the setting with the best worst case of that ratio over worlds and both
methods. Settings within ``--tie`` of it are tied, and the tie goes to the cheaper one
(fewer Fisher samples, then the better mean ratio). H_pt sample sizes are reported, not
chosen (``covariance_max_docs`` keeps every document these worlds have).

Prints progress and every measured number; writes JSON (``--out``) and the section between
``<!-- bench_defaults:start -->`` and ``<!-- bench_defaults:end -->`` of ``--doc``. A
benchmark, not a test: nothing here asserts a quality level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_quality import (Bench, bm25_rows, damping_value, precondition, random_row, with_damping,
                           write_doc_section)  # noqa: E402
from ray_influence import lowrank  # noqa: E402
from ray_influence.config import DEFAULT_QUERY_RANK, EkfacConfig  # noqa: E402
from ray_influence.ekfac import Fisher, ihvp  # noqa: E402
from ray_influence.scoring import Method, flatten  # noqa: E402
from ray_influence.world import WORLD_FAMILY, FamilyWorld, finetune_distance  # noqa: E402

MARKS = ("<!-- bench_defaults:start -->", "<!-- bench_defaults:end -->")
COMMAND = ("RAY_AUTH_MODE=disabled .venv/bin/python jobs/bench_defaults.py "
           "--out docs/bench_defaults.json --doc docs/BENCHMARKS.md")
TITLE = "## Defaults chosen on the exact path, over a family of worlds (`jobs/bench_defaults.py`)"
ALL_DOCS = 10**9
PREVIOUS = {"fisher": "true", "fisher_samples": 4, "damping_ft": "auto*10", "damping_pt": "auto*10"}
"""The defaults before this benchmark (chosen on the k = 32 projected index)."""


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--workdir", default="runs/bench_quality", help="where worlds are built and cached")
    p.add_argument("--worlds", nargs="+", default=[w.name for w in WORLD_FAMILY], help="WORLD_FAMILY names")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="EK-FAC seeds")
    p.add_argument("--dampings", nargs="+", default=["auto*0.001", "auto*0.01", "auto*0.1", "auto", "auto*10",
                                                     "auto*100"],
                   help="each stage's damping grid ('auto*C' or a float)")
    p.add_argument("--fishers", nargs="+", default=["true:1", "true:4", "empirical"],
                   help="Fisher settings: 'true:<fisher_samples>' or 'empirical'")
    p.add_argument("--pt-docs", type=int, nargs="+", default=[ALL_DOCS, 150],
                   help="documents behind H_pt (a seeded sample), reported at the chosen setting; the choice "
                        "uses every document")
    p.add_argument("--tie", type=float, default=0.01, help="worst-case ratios this close to the best are tied")
    p.add_argument("--rank", type=int, default=DEFAULT_QUERY_RANK, help="query rank of the check at the chosen setting")
    p.add_argument("--render", default=None, metavar="JSON", help="only re-render --doc from an earlier --out")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--doc", default=None, help="markdown file whose bench_defaults section is (re)written")
    return p.parse_args(argv)


def parse_fisher(s: str) -> tuple[Fisher, int]:
    if s == "empirical":
        return Fisher.EMPIRICAL, 1
    kind, _, n = s.partition(":")
    if kind != "true" or not n.isdigit():
        raise SystemExit(f"--fishers: expected 'true:<samples>' or 'empirical', got {s!r}")
    return Fisher.TRUE, int(n)


# ----------------------------------------------------------------------------- sweep


def mrr(bench: Bench, s: torch.Tensor) -> dict:
    m = bench.metrics(s)
    return {"all": m["all"]["mrr"], "answered": m["answered"]["mrr"], "recall_all": m["all"]["recall"]}


def score(bench: Bench, u: dict, stage: str) -> torch.Tensor:
    """``[Q, N]`` exact scores of full-space query vectors in the corpus gradients' dtype."""
    docs = bench.doc_flat[stage]
    return flatten(u, bench.names).to(docs.dtype) @ docs.T


def sweep_world(bench: Bench, args) -> dict:
    """``{"multi": {cell: [per-seed mrr]}, "single": {...}}`` with cells ``fisher|all|λ_ft|λ_pt``
    (multi) and ``fisher|λ_ft`` (single), H_pt on every document.

    The empirical Fisher on every document draws nothing from the seed (no label sampling,
    no H_pt sample), so its factors, and its cells, are the same for every seed: it runs
    once (one entry per cell, sd 0). The H_pt sample sizes run at the chosen setting only
    (:func:`hpt_check`).
    """
    multi: dict = {}
    single: dict = {}
    for i, seed in enumerate(args.seeds):
        t0 = time.perf_counter()
        for fname in args.fishers:
            fisher, samples = parse_fisher(fname)
            if i > 0 and fisher is Fisher.EMPIRICAL:
                continue  # the same factors as the first seed's
            fft0, fpt0 = bench.factors(seed, samples, ALL_DOCS, fisher)
            fpts = {b: with_damping(fpt0, damping_value(b)) for b in args.dampings}
            for a in args.dampings:
                fft = with_damping(fft0, damping_value(a))
                uf = {n: ihvp(t, fft[n]) for n, t in bench.q_grads.items()}
                single.setdefault(f"{fname}|{a}", []).append(mrr(bench, score(bench, uf, "finetuned")))
                for b in args.dampings:
                    u = {n: ihvp(t, fpts[b][n]) for n, t in uf.items()}
                    multi.setdefault(f"{fname}|all|{a}|{b}", []).append(mrr(bench, score(bench, u, "pretrained")))
        log(f"  seed {seed}: {time.perf_counter() - t0:.0f}s ({bench.seconds['fit']:.0f}s fitting so far)")
    return {"multi": multi, "single": single}


def hpt_check(bench: Bench, st: dict, sweep: dict, args) -> dict:
    """multi_stage answered MRR at the dampings of ``st`` for every Fisher x H_pt sample size
    (``--pt-docs``), mean over seeds: ``{"<fisher>|<all or n>": mrr}``."""
    out = {}
    for fname in args.fishers:
        for n_pt in args.pt_docs:
            col = f"{fname}|{'all' if n_pt >= ALL_DOCS else n_pt}"
            if n_pt >= len(bench.docs):
                out[col] = mean_of(sweep["multi"][f"{fname}|all|{st['damping_ft']}|{st['damping_pt']}"])
                continue
            cells = []
            for seed in args.seeds:
                fft, fpt = damped_factors(bench, {**st, "fisher": fname}, seed, n_pt)
                u = precondition(Method.MULTI_STAGE, bench.q_grads, fft, fpt)
                cells.append(mrr(bench, score(bench, u, "pretrained")))
            out[col] = mean_of(cells)
    return out


def spectrum(bench: Bench, seed: int) -> dict:
    """Measurable quantities a damping rule could scale with, from the empirical-Fisher factors:
    per stage, the mean over modules of median(Λ) / mean(Λ) (how heavy Λ's top is against
    the mean that ``auto`` scales) and of the share of ΣΛ in its top 1% of entries; the
    fine-tuning and pre-training tokens."""
    fft, fpt = bench.factors(seed, 1, ALL_DOCS, Fisher.EMPIRICAL)
    out = {}
    for stage, f in (("ft", fft), ("pt", fpt)):
        med, top = [], []
        for m in f.values():
            lam = m.lam.flatten().to(torch.float64)
            med.append(float(lam.median() / lam.mean()))
            k = max(1, lam.numel() // 100)
            top.append(float(lam.topk(k).values.sum() / lam.sum()))
        out[f"lam_{stage}_median_over_mean"] = statistics.fmean(med)
        out[f"lam_{stage}_top1pct_share"] = statistics.fmean(top)
    out["ft_tokens"] = sum(len(e) for e in bench.ft_examples)
    out["pt_tokens"] = sum(len(d) for d in bench.docs)
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return float("nan")
    return statistics.correlation(rx, ry)


def multiplier(spec: str) -> float:
    """``auto*C`` -> C, ``auto`` -> 1 (a float damping has no multiplier: nan)."""
    if spec == "auto":
        return 1.0
    return float(spec.split("*")[1]) if spec.startswith("auto*") else float("nan")


def mean_of(cells: list[dict], key: str = "answered") -> float:
    return statistics.fmean(c[key] for c in cells)


def sd_of(cells: list[dict], key: str = "answered") -> float:
    return statistics.stdev(c[key] for c in cells) if len(cells) > 1 else 0.0


def setting_cells(st: dict) -> tuple[str, str]:
    """The multi and single cell names of a setting ``{fisher, damping_ft, damping_pt}``."""
    return f"{st['fisher']}|all|{st['damping_ft']}|{st['damping_pt']}", f"{st['fisher']}|{st['damping_ft']}"


def candidates(args) -> list[dict]:
    return [{"fisher": f, "damping_ft": a, "damping_pt": b} for f in args.fishers for a in args.dampings
            for b in args.dampings]


def ratios(world: dict, st: dict) -> dict:
    """A setting's answered MRR over the world's best, per method (the best over every setting with all H_pt docs)."""
    m, s = setting_cells(st)
    best_m = max(mean_of(v) for k, v in world["multi"].items() if k.split("|")[1] == "all")
    best_s = max(mean_of(v) for v in world["single"].values())
    return {"multi_stage": mean_of(world["multi"][m]) / best_m, "single_stage": mean_of(world["single"][s]) / best_s}


def choose(sweeps: dict, tuning: list[str], args) -> tuple[dict, list[dict]]:
    """The rule of the module docstring; returns the chosen setting and every candidate's worst/mean ratio."""
    table = []
    for st in candidates(args):
        r = [v for w in tuning for v in ratios(sweeps[w], st).values()]
        table.append({**st, "worst": min(r), "mean": statistics.fmean(r)})
    best_worst = max(t["worst"] for t in table)
    tied = [t for t in table if t["worst"] >= best_worst - args.tie]
    chosen = min(tied, key=lambda t: (parse_fisher(t["fisher"])[1], -t["mean"]))
    return chosen, sorted(table, key=lambda t: -t["worst"])


def damped_factors(bench: Bench, st: dict, seed: int, pt_docs: int = ALL_DOCS) -> tuple[dict, dict]:
    """(H_ft, H_pt) factors of setting ``st`` (its Fisher and both dampings), H_pt on ``pt_docs`` documents."""
    fisher, samples = parse_fisher(st["fisher"])
    fft0, fpt0 = bench.factors(seed, samples, pt_docs, fisher)
    return with_damping(fft0, damping_value(st["damping_ft"])), with_damping(fpt0, damping_value(st["damping_pt"]))


def rank_check(bench: Bench, st: dict, seed: int, rank: int) -> dict:
    """multi/single MRR at ``st`` exact and with each module's query cut to ``rank`` (the default pass)."""
    fft, fpt = damped_factors(bench, st, seed)
    uf = {n: ihvp(t, fft[n]) for n, t in bench.q_grads.items()}
    out = {}
    for name, u, stage in (("single_stage", uf, "finetuned"),
                           ("multi_stage", {n: ihvp(t, fpt[n]) for n, t in uf.items()}, "pretrained")):
        u_r = {n: lowrank.dense(lowrank.truncate(u[n], rank)) for n in bench.names}
        out[name] = {"exact": mrr(bench, score(bench, u, stage)), f"rank{rank}": mrr(bench, score(bench, u_r, stage))}
    return out


def open_bench(fw: FamilyWorld, workdir: str) -> Bench:
    """The world's Bench (built or loaded from ``workdir``), corpus gradients held in float32."""
    fields = {k: v for k, v in dataclasses.asdict(fw.spec).items() if k != "seed"}
    return Bench(fw.spec.seed, workdir, dtype=torch.float32, **fields)


def world_info(fw: FamilyWorld, bench: Bench) -> dict:
    s = bench.world.stats
    return {"name": fw.name, "varies": fw.varies, "held_out": fw.held_out, "key": fw.spec.key,
            "tokenizer": fw.spec.tokenizer, "hidden": fw.spec.hidden, "layers": fw.spec.layers,
            "docs": s["docs"], "queries": s["queries"], "answered": sum(bench.answered),
            "parameters": s["parameters"], "gradient_width": int(bench.doc_flat["pretrained"].shape[1]),
            "memorisation": s["memorisation"], "qa_heldout": s["qa_heldout"],
            "finetune_distance": s.get("finetune_distance", finetune_distance(bench.pt, bench.ft)),
            "finetune_steps": fw.spec.finetune_steps, "finetune_lr": fw.spec.finetune_lr}


RULE_QUANTITIES = ("finetune_distance", "ft_tokens", "lam_ft_median_over_mean", "lam_ft_top1pct_share",
                   "lam_pt_median_over_mean", "lam_pt_top1pct_share")


def damping_rule(res: dict) -> dict:
    """Whether each world's best multi_stage λ (as an ``auto`` multiplier) follows a measurable
    quantity: Spearman over all worlds between log10 of the best multiplier and each of
    :data:`RULE_QUANTITIES`, per stage."""
    best = {w["name"]: res["per_world"][w["name"]]["multi_best"]["cell"].split("|") for w in res["worlds"]}
    out = {"best": {n: {"ft": multiplier(b[2]), "pt": multiplier(b[3])} for n, b in best.items()}, "spearman": {}}
    for stage in ("ft", "pt"):
        y = [math.log10(out["best"][w["name"]][stage]) for w in res["worlds"]]
        out["spearman"][stage] = {q: spearman([float(w[q]) for w in res["worlds"]], y) for q in RULE_QUANTITIES}
    return out


# -------------------------------------------------------------------------- markdown


def f3(x: float) -> str:
    return f"{x:.3f}"


def cell_label(cell: str) -> str:
    """``empirical|all|auto|auto*10`` -> ``empirical, λ_ft auto, λ_pt auto*10`` (no '|' inside table cells)."""
    parts = cell.split("|")
    if len(parts) == 2:
        return f"{parts[0]}, λ_ft {parts[1]}"
    if len(parts) == 4:
        return f"{parts[0]}, λ_ft {parts[2]}, λ_pt {parts[3]}" + ("" if parts[1] == "all" else f", H_pt {parts[1]} docs")
    raise ValueError(f"not a sweep cell: {cell!r}")


def column_label(col: str) -> str:
    """``true:4|150`` -> ``true:4, H_pt 150 docs``."""
    fisher, n = col.split("|")
    return f"{fisher}, {'all docs' if n == 'all' else f'H_pt {n} docs'}"


def render(res: dict) -> str:
    ch, prev = res["chosen"], PREVIOUS
    names = [w["name"] for w in res["worlds"]]
    info = {w["name"]: w for w in res["worlds"]}
    lines = [
        MARKS[0],
        "",
        f"`{COMMAND}` ({res['seconds'] / 60:.0f} min on 2 cores; torch {res['versions']['torch']}; "
        f"EK-FAC seeds {', '.join(map(str, res['args']['seeds']))}). Exact scores of every corpus document "
        "against full-space query vectors: the default pass (rank-16 query factors) keeps them, see the last table.",
        "",
        "**The worlds** (`ray_influence.world.WORLD_FAMILY`; fine-tuning distance = ‖θ_ft − θ_pt‖ / ‖θ_pt‖):",
        "",
        "| world | varies | tokenizer | width x blocks | docs | queries (answered) | fine-tuning distance | role |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        w = info[n]
        lines.append(f"| {n} | {w['varies']} | {w['tokenizer']} | {w['hidden']} x {w['layers']} | {w['docs']} | "
                     f"{w['queries']} ({w['answered']}) | {w['finetune_distance']:.1%} | "
                     f"{'**held out**' if w['held_out'] else 'tuning'} |")
    lines += [
        "",
        "**The rule.** On the tuning worlds, a setting's multi_stage MRR (answered queries, mean over seeds) is "
        "divided by that world's best multi_stage MRR over every setting, and likewise single_stage at the "
        "setting's λ_ft and Fisher (the two methods share those keys). The default is the setting with the best "
        f"worst case of these ratios over the tuning worlds and both methods; settings within {res['args']['tie']} "
        "of it are tied, and the tie goes to fewer Fisher samples (cheaper), then to the better mean ratio. "
        "H_pt sample sizes are reported, not chosen.",
        "",
        f"**Chosen:** Fisher `{ch['fisher']}`, λ_ft `{ch['damping_ft']}`, λ_pt `{ch['damping_pt']}` "
        f"(worst-case ratio {f3(ch['worst'])}, mean {f3(ch['mean'])} on the tuning worlds). "
        f"Previous defaults (Fisher true:4, both `auto*10`, chosen on the k = 32 projected index): "
        f"worst case {f3(res['previous_ratio']['worst'])}, mean {f3(res['previous_ratio']['mean'])}.",
        "",
        "Top candidates by worst case (tuning worlds, both methods):",
        "",
        "| Fisher | λ_ft | λ_pt | worst ratio | mean ratio |",
        "|---|---|---|---|---|",
    ]
    for t in res["candidates"][:8]:
        lines.append(f"| {t['fisher']} | {t['damping_ft']} | {t['damping_pt']} | {f3(t['worst'])} | {f3(t['mean'])} |")
    lines += [
        "",
        "**Per world, at the chosen defaults** (MRR on answered queries, mean ± sd over seeds; *own best* is the "
        "world's best setting in the grid and what the defaults lose against it; BM25 on prompt + completion):",
        "",
        "| world | multi_stage | own best (setting) | loss | single_stage | own best | loss | previous defaults "
        "multi / single | BM25 | random |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        p = res["per_world"][n]
        lines.append(
            f"| {n}{' (held out)' if info[n]['held_out'] else ''} | {p['multi']['mean']:.3f} ± {p['multi']['sd']:.3f} | "
            f"{p['multi_best']['mean']:.3f} ({cell_label(p['multi_best']['cell'])}) | {p['multi_loss']:.1%} | "
            f"{p['single']['mean']:.3f} ± {p['single']['sd']:.3f} | {p['single_best']['mean']:.3f} "
            f"({cell_label(p['single_best']['cell'])}) | {p['single_loss']:.1%} | {p['previous']['multi']:.3f} / "
            f"{p['previous']['single']:.3f} | {p['bm25']:.3f} | {p['random']:.3f} |")
    lines += [
        "",
        "Means over the tuning worlds and over the held-out worlds (answered MRR at the chosen defaults):",
        "",
        "| worlds | multi_stage | single_stage | multi − single | previous multi / single | BM25 |",
        "|---|---|---|---|---|---|",
    ]
    for group, g in res["groups"].items():
        lines.append(f"| {group} | {f3(g['multi'])} | {f3(g['single'])} | {g['multi'] - g['single']:+.3f} | "
                     f"{f3(g['previous_multi'])} / {f3(g['previous_single'])} | {f3(g['bm25'])} |")
    lines += ["", "**Fisher type, samples and H_pt size at the chosen dampings** (multi_stage answered MRR, mean over "
              "seeds):", "", "| world | " + " | ".join(column_label(c) for c in res["fisher_columns"]) + " |",
              "|---|" + "---|" * len(res["fisher_columns"])]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f3(res["fisher_table"][n][c]) for c in res["fisher_columns"]) + " |")
    lines += ["", f"**The default pass at the chosen setting** (seed {res['args']['seeds'][0]}, answered MRR, exact vs "
              f"rank-{res['args']['rank']} query factors):", "",
              "| world | multi exact | multi rank | single exact | single rank |", "|---|---|---|---|---|"]
    r = f"rank{res['args']['rank']}"
    for n in names:
        c = res["rank_check"][n]
        lines.append(f"| {n} | {f3(c['multi_stage']['exact']['answered'])} | {f3(c['multi_stage'][r]['answered'])} | "
                     f"{f3(c['single_stage']['exact']['answered'])} | {f3(c['single_stage'][r]['answered'])} |")
    lines += ["", "**Does the best damping follow something measurable?** Best (λ_ft, λ_pt) of multi_stage per "
              "world beside quantities a rule could scale with (Λ statistics from the empirical-Fisher factors, "
              "mean over modules; *med/mean* = median(Λ) / mean(Λ), the mean being what `auto` scales; *top 1%* = "
              "share of ΣΛ in the largest 1% of entries):", "",
              "| world | fine-tuning distance | fine-tuning tokens | Λ_ft med/mean | Λ_ft top 1% | Λ_pt med/mean | "
              "Λ_pt top 1% | best λ_ft | best λ_pt | best Fisher |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        b, w = res["per_world"][n]["multi_best"]["cell"].split("|"), info[n]
        lines.append(f"| {n} | {w['finetune_distance']:.1%} | {w['ft_tokens']} | {w['lam_ft_median_over_mean']:.2e} | "
                     f"{w['lam_ft_top1pct_share']:.2f} | {w['lam_pt_median_over_mean']:.2e} | "
                     f"{w['lam_pt_top1pct_share']:.2f} | {b[2]} | {b[3]} | {b[0]} |")
    sp = res["rule"]["spearman"]
    lines += ["", "Spearman over the worlds between log10 of the best multiplier and each quantity (n = "
              f"{len(names)} worlds; with ties on a grid of {len(res['args']['dampings'])} values, |ρ| below ~0.7 is "
              "indistinguishable from none):", "",
              "| best | " + " | ".join(RULE_QUANTITIES) + " |", "|---|" + "---|" * len(RULE_QUANTITIES)]
    for stage in ("ft", "pt"):
        lines.append(f"| λ_{stage} | " + " | ".join(f"{sp[stage][q]:+.2f}" for q in RULE_QUANTITIES) + " |")
    lines += ["", "The empirical Fisher on every document draws nothing from the seed (no label sampling, no H_pt "
              "sample), so it runs once per world (sd 0 above); the true Fisher's and the H_pt samples' spread "
              "over seeds is in the JSON.", "", MARKS[1]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def main(args) -> int:
    if args.render:
        write_doc_section(args.doc, render(json.loads(Path(args.render).read_text())), MARKS, TITLE)
        return 0
    t_start = time.perf_counter()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    family = {w.name: w for w in WORLD_FAMILY}
    unknown = [n for n in args.worlds if n not in family]
    if unknown:
        raise SystemExit(f"--worlds: unknown {unknown}; WORLD_FAMILY has {list(family)}")
    res: dict = {"args": vars(args), "previous": PREVIOUS, "versions": {"torch": torch.__version__,
                                                                        "python": platform.python_version()},
                 "config_defaults": {"fisher": EkfacConfig().fisher, "fisher_samples": EkfacConfig().fisher_samples,
                                     "damping": EkfacConfig().damping},
                 "worlds": [], "sweeps": {}, "bm25": {}, "random": {}}
    benches_kept: dict = {}
    for name in args.worlds:
        fw = family[name]
        log(f"world {name} ({fw.varies}{', held out' if fw.held_out else ''})")
        bench = open_bench(fw, args.workdir)
        info = world_info(fw, bench)
        res["worlds"].append(info)
        log(f"  {info}")
        res["sweeps"][name] = sweep_world(bench, args)
        info.update(spectrum(bench, args.seeds[0]))
        res["bm25"][name] = bm25_rows(bench)["bm25 (prompt + completion)"]["answered"]["mrr"]["mean"]
        res["random"][name] = random_row(bench)["answered"]["mrr"]["mean"]
        benches_kept[name] = bench  # for the rank check at the chosen setting
        if info["gradient_width"] > 200_000:  # the wide worlds: re-built from cache later (GBs each)
            benches_kept[name] = None
            del bench

    tuning = [w["name"] for w in res["worlds"] if not w["held_out"]]
    chosen, table = choose(res["sweeps"], tuning, args)
    res["chosen"], res["candidates"] = chosen, table
    prev = next(t for t in table if all(t[k] == v for k, v in
                                        {"fisher": "true:4", "damping_ft": PREVIOUS["damping_ft"],
                                         "damping_pt": PREVIOUS["damping_pt"]}.items()))
    res["previous_ratio"] = {"worst": prev["worst"], "mean": prev["mean"]}
    log(f"chosen: {chosen}; previous defaults: {res['previous_ratio']}")

    res["per_world"], res["fisher_table"], res["rank_check"] = {}, {}, {}
    cols = [f"{f}|{'all' if n >= ALL_DOCS else n}" for f in args.fishers for n in args.pt_docs]
    res["fisher_columns"] = cols
    for w in res["worlds"]:
        n, sw = w["name"], res["sweeps"][w["name"]]
        m, s = setting_cells(chosen)
        pm_, ps_ = setting_cells({"fisher": "true:4", "damping_ft": PREVIOUS["damping_ft"],
                                  "damping_pt": PREVIOUS["damping_pt"]})
        best_m = max(((k, v) for k, v in sw["multi"].items() if k.split("|")[1] == "all"), key=lambda kv: mean_of(kv[1]))
        best_s = max(sw["single"].items(), key=lambda kv: mean_of(kv[1]))
        res["per_world"][n] = {
            "multi": {"mean": mean_of(sw["multi"][m]), "sd": sd_of(sw["multi"][m]),
                      "all_queries": mean_of(sw["multi"][m], "all")},
            "single": {"mean": mean_of(sw["single"][s]), "sd": sd_of(sw["single"][s]),
                       "all_queries": mean_of(sw["single"][s], "all")},
            "multi_best": {"cell": best_m[0], "mean": mean_of(best_m[1])},
            "single_best": {"cell": best_s[0], "mean": mean_of(best_s[1])},
            "previous": {"multi": mean_of(sw["multi"][pm_]), "single": mean_of(sw["single"][ps_])},
            "bm25": res["bm25"][n], "random": res["random"][n]}
        p = res["per_world"][n]
        p["multi_loss"] = 1 - p["multi"]["mean"] / p["multi_best"]["mean"]
        p["single_loss"] = 1 - p["single"]["mean"] / p["single_best"]["mean"]
        log(f"  {n}: {json.dumps(p)}")
    res["groups"] = {}
    for group, held in (("tuning", False), ("held out", True)):
        ws = [w["name"] for w in res["worlds"] if w["held_out"] is held]
        if ws:
            pw = res["per_world"]
            res["groups"][group] = {
                "multi": statistics.fmean(pw[n]["multi"]["mean"] for n in ws),
                "single": statistics.fmean(pw[n]["single"]["mean"] for n in ws),
                "previous_multi": statistics.fmean(pw[n]["previous"]["multi"] for n in ws),
                "previous_single": statistics.fmean(pw[n]["previous"]["single"] for n in ws),
                "bm25": statistics.fmean(pw[n]["bm25"] for n in ws)}

    res["rule"] = damping_rule(res)
    log(f"damping rule: {json.dumps(res['rule'])}")
    log(f"the default pass (rank {args.rank}) at the chosen setting, seed {args.seeds[0]}; H_pt sample sizes")
    for w in res["worlds"]:
        n = w["name"]
        bench = benches_kept.get(n)
        if bench is None:
            bench = open_bench(family[n], args.workdir)
        res["rank_check"][n] = rank_check(bench, chosen, args.seeds[0], args.rank)
        res["fisher_table"][n] = hpt_check(bench, chosen, res["sweeps"][n], args)
        benches_kept[n] = None
        del bench
        log(f"  {n}: {json.dumps(res['rank_check'][n])}")

    res["seconds"] = time.perf_counter() - t_start
    log(f"done in {res['seconds']:.0f}s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {args.out}")
    if args.doc:
        write_doc_section(args.doc, render(res), MARKS, TITLE)
        log(f"wrote the bench_defaults section of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
