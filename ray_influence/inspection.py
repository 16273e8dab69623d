"""``ray-influence inspect RUN_DIR``: what a run directory holds, read from its pieces.

Which stages are done comes from the pieces' markers (what a rerun would skip), not only
from ``manifest.json``, which the driver writes when a job ends: a crashed run shows what
it had finished. The manifest gives each stage's seconds. Nothing is written.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from .data import InputError
from .query_input import read_skipped_reasons
from .rundir import RunDir
from .scoring import Method
from .store import QUERY_ENERGY_TABLE, STAGES, TOKEN_TABLES, factors_rel, method_table_rel, queries_rel

STAGE_NAMES = ("fit", "index", "query", "score", "tokens")


class NotARun(InputError):
    """The directory is not a run directory (exit code 2)."""


def open_run(url: str) -> RunDir:
    """The run directory at ``url``.

    Raises:
        NotARun: when ``url`` does not exist or holds no ``run.json``.
    """
    try:
        run = RunDir(url)
        exists, has_config = run.fs.exists(run.root), run.exists("run.json")
    except (OSError, ValueError) as e:
        raise NotARun(f"cannot open run directory {url!r}: {e}") from None
    if not exists:
        raise NotARun(f"run directory {url!r} does not exist")
    if not has_config:
        raise NotARun(f"{url!r} is not a ray-influence run directory (no run.json); "
                      "give the run_dir of a config that was run")
    return run


def _markers(run: RunDir, rel_dir: str, suffix: str) -> dict[str, dict]:
    """``{piece name: marker}`` of the completed pieces ``rel_dir/*{suffix}``."""
    names = set(run.listdir(rel_dir))
    pieces = [n for n in names if n.endswith(suffix) and n + ".json" in names]
    if not pieces:
        return {}
    paths = [run.path(f"{rel_dir}/{n}.json") for n in pieces]
    data = run.fs.cat(paths)  # one concurrent request per marker on object stores
    out = {}
    for n, p in zip(pieces, paths):
        raw = data.get(p) if isinstance(data, dict) else data
        try:
            out[n] = json.loads(raw)
        except (TypeError, ValueError):
            continue  # a damaged marker: the piece is not done
    return out


def _parquet_rows(run: RunDir, rel: str) -> int | None:
    if not run.exists(rel):
        return None
    with run.fs.open(run.path(rel), "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def describe_run(url: str) -> dict[str, Any]:
    """Everything ``inspect`` prints, as a dict (``--json`` prints it as is)."""
    run = open_run(url)
    cfg = run.read_json("run.json")["config"]
    manifest = run.read_json("manifest.json") if run.exists("manifest.json") else {"stages": {}}
    methods = [Method.parse(m) for m in cfg["scoring"]["methods"]]
    doc_stages = sorted({m.doc_model for m in methods}, key=STAGES.index)
    fit_stages = [s for s in STAGES if any(s in m.needs_factors for m in methods)]

    factors = {s: run.piece_done(factors_rel(s, 0)) is not None for s in STAGES}
    docs = _markers(run, "docs", ".parquet")
    index = {s: _markers(run, f"index/{s}/shard-0", ".safetensors") for s in doc_stages}
    part_keys = set(manifest.get("partitions", {})) or {n.removesuffix(".parquet") for n in docs}
    mode = cfg["scoring"].get("mode") or ("fused" if cfg["scoring"].get("fused") else "index")
    fused = mode != "index"  # exact or fused: the corpus pass wrote documents and top-k pieces, no index
    indexed = [k for k in part_keys if f"{k}.parquet" in docs
               and (fused or all(f"{k}.safetensors" in index[s] for s in doc_stages))]
    queries = run.piece_done(queries_rel(0))
    results = {m.value: _parquet_rows(run, f"results/method={m.value}/part-0.parquet") for m in methods}
    tokens = {t: {m.value: _parquet_rows(run, method_table_rel(t, m.value)) for m in methods} for t in TOKEN_TABLES}
    skipped: Counter = Counter()
    if run.exists("skipped.parquet"):
        # use_threads=False: pyarrow's thread pool and torch's can abort the interpreter at exit.
        table = pq.read_table(io.BytesIO(run.read_bytes("skipped.parquet")), columns=["reason"], use_threads=False)
        skipped.update(table.column("reason").to_pylist())
    skipped_queries = read_skipped_reasons(run)  # None: no skipped_queries.parquet (a run from before the list)

    token_top = cfg["scoring"].get("token_influence_top", 0)
    status = {
        "fit": _status(sum(factors[s] for s in fit_stages), len(fit_stages)) if fit_stages else "not needed",
        "index": (f"{mode}: " if fused else "") + _status(len(indexed), len(part_keys)),
        "query": _status(int(queries is not None), 1),
        "score": _status(sum(v is not None for v in results.values()), len(methods)),
        "tokens": _status(sum(v is not None for v in tokens["token_influence"].values()), len(methods))
        if token_top else "disabled",
    }
    stages = {}
    for name in STAGE_NAMES:
        m = manifest["stages"].get(name, {})
        stages[name] = {"status": status[name], "seconds": m.get("seconds"), "finished": m.get("finished")}
    return {
        "run_dir": run.url,
        "pretrained_model": cfg["pretrained_model"],
        "finetuned_model": cfg["finetuned_model"],
        "methods": [m.value for m in methods],
        "projection_dim": cfg["projection"]["dim"],
        "fused": fused,
        "mode": mode,
        "query_rank": cfg["scoring"].get("query_rank") if mode == "exact" else None,
        "query_energy": retained_energy(run),
        "stages": stages,
        "factors": {s: factors[s] for s in fit_stages},
        "partitions": {"total": len(part_keys), "indexed": len(indexed),
                       **{f"index_{s}": len(index[s]) for s in doc_stages}},
        "documents": {"indexed": sum(int(docs[f"{k}.parquet"].get("docs", 0)) for k in indexed),
                      "skipped": sum(skipped.values())},
        "queries": queries.get("queries") if queries else None,
        "queries_skipped": sum(skipped_queries.values()) if skipped_queries is not None else None,
        "queries_skipped_by_reason": dict(sorted((skipped_queries or {}).items())),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "results_rows": results,
        "token_influence_rows": tokens["token_influence"],
        "layer_influence_rows": tokens["layer_influence"],
    }


def retained_energy(run: RunDir) -> dict[str, dict[Any, float]]:
    """``{method: {query_id: Σ_m kept / Σ_m ‖u_m‖²}}`` from ``query_energy.parquet`` (exact mode); {} without it."""
    if not run.exists(QUERY_ENERGY_TABLE):
        return {}
    table = pq.read_table(io.BytesIO(run.read_bytes(QUERY_ENERGY_TABLE)), use_threads=False).to_pydict()
    sums: dict[str, dict[Any, list[float]]] = {}
    for m, q, e, r in zip(table["method"], table["query_id"], table["energy"], table["retained_energy"]):
        kt = sums.setdefault(m, {}).setdefault(q, [0.0, 0.0])
        kt[0] += e * r
        kt[1] += e
    return {m: {q: (k / t if t > 0 else 1.0) for q, (k, t) in per.items()} for m, per in sums.items()}


def _status(done: int, total: int) -> str:
    if total and done == total:
        return "done"
    return "not run" if done == 0 else f"partial ({done}/{total})"


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}s"


def format_run(info: dict[str, Any]) -> str:
    """The human-readable report of :func:`describe_run`."""
    p, d = info["partitions"], info["documents"]
    lines = [
        f"run        {info['run_dir']}",
        f"models     pretrained {info['pretrained_model']}",
        f"           finetuned  {info['finetuned_model']}",
        f"methods    {', '.join(info['methods'])}   projection dim {info['projection_dim'] or '0 (exact)'}",
        "",
        "stage    status         time",
    ]
    detail = {
        "fit": ", ".join(f"{s} factors {'yes' if ok else 'no'}" for s, ok in info["factors"].items()),
        "index": f"{p['indexed']}/{p['total']} partitions" + (f" scored in the corpus pass ({info['mode']}), no index"
                                                              if info["fused"] else ""),
        "query": f"{info['queries']} queries{_skipped_queries(info)}" if info["queries"] is not None else "",
        "score": ", ".join(f"{m} {n} rows" for m, n in info["results_rows"].items() if n is not None),
        "tokens": ", ".join(f"{m} {n} rows" for m, n in info["token_influence_rows"].items() if n is not None),
    }
    for name, s in info["stages"].items():
        lines.append(f"{name:<8} {s['status']:<14} {_seconds(s['seconds']):>7}   {detail[name]}".rstrip())
    lines += [
        "",
        f"documents  {d['indexed']} {'scored (fused)' if info['fused'] else 'indexed'}, {d['skipped']} skipped",
        f"partitions {p['total']} ({p['indexed']} {'scored (fused)' if info['fused'] else 'indexed'})",
        f"queries    {info['queries'] if info['queries'] is not None else '-'}{_skipped_queries(info)}",
    ]
    if info["query_energy"]:
        lines.append(f"query energy kept at rank {info['query_rank'] or 'full'} (share of |u|^2, per query)")
        for m, per in info["query_energy"].items():
            v = list(per.values())
            worst = min(per, key=per.get)
            lines.append(f"  {m:<13} min {min(v):.3f} ({worst})  mean {sum(v) / len(v):.3f}")
    for title, key in (("skipped by reason", "skipped_by_reason"),
                       ("skipped queries by reason", "queries_skipped_by_reason")):
        if info[key]:
            lines.append(title)
            width = max(len(r) for r in info[key])
            lines += [f"  {r:<{width}}  {n}" for r, n in info[key].items()]
    return "\n".join(lines)


def _skipped_queries(info: dict[str, Any]) -> str:
    """``, N skipped`` after a query count, when the run lists its skipped queries."""
    n = info.get("queries_skipped")
    return "" if n is None else f", {n} skipped"
