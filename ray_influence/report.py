"""``ray-influence report RUN_DIR``: one self-contained HTML page for a run.

Per query: its prompt and completion, and per method the top documents with their scores,
each token of the documents that have per-token influence (``token_influence/``) shaded by
its term (red: raises the score, blue: lowers it; one colour scale per query and method),
a histogram of the query's top-k scores, and the contribution of each decoder block summed
over those documents (``layer_influence/``). Inline CSS and SVG only: no script, no font,
no image or stylesheet from anywhere else, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import html
import io
import time
from collections import defaultdict
from typing import Any, Sequence

import fsspec
import pyarrow.parquet as pq

from .inspection import describe_run, open_run
from .rundir import DamagedArtifact, RunDir
from .store import method_table_rel

DEFAULT_DOCS = 10
POSITIVE, NEGATIVE = (214, 39, 40), (31, 119, 180)  # proponent red, opponent blue

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header,main{max-width:1100px;margin:0 auto;padding:12px 24px}
header{border-bottom:1px solid #ddd;background:#fff;max-width:none}
h1{font-size:22px;margin:8px 0} h2{font-size:18px;margin:0 0 8px} h3{font-size:15px;margin:0}
table.meta{border-collapse:collapse;margin:6px 0} table.meta td,table.meta th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
nav a{margin-right:10px}
section.query{background:#fff;border:1px solid #ddd;border-radius:6px;margin:16px 0;padding:14px 18px}
.qa{display:grid;grid-template-columns:110px 1fr;gap:4px 10px;margin-bottom:10px}
.qa .label{color:#666;font-weight:600}
.qa pre{margin:0;white-space:pre-wrap;font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
details.method{border-top:1px solid #eee;padding:8px 0}
details.method>summary{cursor:pointer;font-weight:600;font-size:15px}
.plots{display:flex;flex-wrap:wrap;gap:18px;margin:8px 0}
figure{margin:0} figcaption{color:#555;font-size:12px}
ol.docs{padding-left:0;list-style:none;margin:6px 0}
li.doc{border:1px solid #eee;border-radius:4px;padding:6px 10px;margin:6px 0}
.docmeta{color:#444;font-size:12px;margin-bottom:3px}
.docmeta b{color:#111}
.tokens{white-space:pre-wrap;font:13px/1.9 ui-monospace,Menlo,Consolas,monospace;word-break:break-word}
.tok{border-radius:2px;padding:1px 0}
.plain{white-space:pre-wrap;font:13px/1.5 ui-monospace,Menlo,Consolas,monospace;color:#333}
.legend{font-size:12px;color:#555}
.swatch{display:inline-block;width:12px;height:12px;vertical-align:middle;border-radius:2px;margin:0 3px}
.note{color:#777;font-style:italic}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: float) -> str:
    return f"{x:.4g}"


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:.1f}s"


def _read_table(run: RunDir, rel: str, verified: bool = False) -> list[dict] | None:
    """Rows of one Parquet file in the run, or None when it is not there."""
    if not run.exists(rel):
        return None
    data = run.read_piece(rel) if verified else run.read_bytes(rel)
    # use_threads=False: pyarrow's thread pool and torch's can abort the interpreter at exit.
    return pq.read_table(io.BytesIO(data), use_threads=False).to_pylist()


def _shade(value: float, scale: float) -> str:
    """A background colour whose opacity grows with ``|value| / scale``."""
    alpha = 0.0 if scale <= 0 else min(1.0, abs(value) / scale) * 0.85
    r, g, b = POSITIVE if value >= 0 else NEGATIVE
    return f"rgba({r},{g},{b},{alpha:.3f})"


def histogram_svg(values: Sequence[float], width: int = 360, height: int = 150, bins: int = 20) -> str:
    """Inline SVG histogram of ``values``, with the range and the largest count labelled."""
    pad_l, pad_b, pad_t = 34, 26, 10
    if not values:
        return '<svg class="score-hist" width="0" height="0"></svg>'
    lo, hi = min(values), max(values)
    bins = max(1, min(bins, len(values)))
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / span * bins))] += 1
    top = max(counts)
    w = (width - pad_l - 6) / bins
    bars = []
    for i, c in enumerate(counts):
        h = (height - pad_b - pad_t) * c / top
        x, y = pad_l + i * w, height - pad_b - h
        left = lo + span * i / bins
        bars.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{max(w - 1, 1):.1f}" height="{h:.1f}" '
                    f'fill="#4a78b5"><title>{c} documents from {_num(left)}</title></rect>')
    base = height - pad_b
    return (
        f'<svg class="score-hist" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram of the top scores">'
        f'<line x1="{pad_l}" y1="{base}" x2="{width - 6}" y2="{base}" stroke="#888"/>'
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{base}" stroke="#888"/>'
        + "".join(bars)
        + f'<text x="{pad_l}" y="{height - 8}" font-size="11" fill="#444">{_e(_num(lo))}</text>'
        f'<text x="{width - 6}" y="{height - 8}" font-size="11" fill="#444" text-anchor="end">{_e(_num(hi))}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + 9}" font-size="11" fill="#444" text-anchor="end">{top}</text>'
        f'<text x="{pad_l - 4}" y="{base}" font-size="11" fill="#444" text-anchor="end">0</text>'
        "</svg>"
    )


def layer_svg(per_block: dict[int, float], width: int = 360) -> str:
    """Inline SVG horizontal bars: the contribution of each decoder block (signed)."""
    row, pad_l, pad_r = 18, 64, 70
    height = row * len(per_block) + 10
    if not per_block:
        return '<svg class="layer-plot" width="0" height="0"></svg>'
    scale = max(abs(v) for v in per_block.values()) or 1.0
    half = (width - pad_l - pad_r) / 2
    mid = pad_l + half
    parts = [f'<line x1="{mid:.1f}" y1="2" x2="{mid:.1f}" y2="{height - 4}" stroke="#888"/>']
    for i, (block, v) in enumerate(sorted(per_block.items())):
        y = 5 + i * row
        w = half * abs(v) / scale
        x = mid if v >= 0 else mid - w
        colour = "#%02x%02x%02x" % (POSITIVE if v >= 0 else NEGATIVE)
        parts.append(f'<text x="{pad_l - 6}" y="{y + 12}" font-size="11" fill="#444" text-anchor="end">block {block}</text>'
                     f'<rect class="bar" x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="{row - 5}" fill="{colour}">'
                     f'<title>block {block}: {_num(v)}</title></rect>'
                     f'<text x="{width - 4}" y="{y + 12}" font-size="11" fill="#444" text-anchor="end">{_e(_num(v))}</text>')
    return (f'<svg class="layer-plot" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="contribution per decoder block">'
            + "".join(parts) + "</svg>")


def _tokens_html(tokens: list[tuple[str, float]], scale: float) -> str:
    # Tokenizers that keep whitespace in their tokens (BPE) are joined as they are; word-level
    # ones, whose tokens hold none, with a space.
    joiner = "" if any(t[:1].isspace() or t[-1:].isspace() for t, _ in tokens) else " "
    return joiner.join(f'<span class="tok" style="background:{_shade(s, scale)}" title="{_e(_num(s))}">{_e(t)}</span>'
                       for t, s in tokens)


def _method_html(method: str, results: list[dict], tokens: dict, layers: dict, n_docs: int, open_: bool) -> str:
    """One method's block for one query: plots and top documents."""
    results = sorted(results, key=lambda r: r["rank"])
    shown = results[:n_docs]
    toks = {r["doc_id"]: tokens.get(r["doc_id"]) for r in shown}
    scale = max((abs(s) for t in toks.values() if t for _, s in t), default=0.0)
    per_block: dict[int, float] = defaultdict(float)
    for doc_id in toks:
        for block, s in layers.get(doc_id, []):
            per_block[block] += s
    with_tokens = sum(1 for t in toks.values() if t)
    docs = []
    for r in shown:
        t = toks[r["doc_id"]]
        body = (f'<div class="tokens">{_tokens_html(t, scale)}</div>' if t
                else f'<div class="plain">{_e(r["doc_text"])}</div>')
        docs.append(f'<li class="doc" data-doc-id="{_e(r["doc_id"])}" data-rank="{r["rank"]}">'
                    f'<div class="docmeta">#{r["rank"]} · doc <b>{_e(r["doc_id"])}</b> · score <b>{_e(_num(r["score"]))}</b></div>'
                    f"{body}</li>")
    layer_fig = (f'<figure>{layer_svg(dict(per_block))}<figcaption>contribution per decoder block, '
                 f'summed over the {with_tokens} documents with per-token influence</figcaption></figure>'
                 if per_block else '<p class="note">no per-layer influence stored (scoring.token_influence_top: 0)</p>')
    return (
        f'<details class="method" data-method="{_e(method)}"{" open" if open_ else ""}><summary>{_e(method)}</summary>'
        f'<div class="plots"><figure>{histogram_svg([r["score"] for r in results])}'
        f"<figcaption>scores of the top {len(results)} documents</figcaption></figure>{layer_fig}</div>"
        f'<ol class="docs">{"".join(docs)}</ol></details>'
    )


def _mode_text(info: dict) -> str:
    mode = info["mode"]
    if mode == "exact":
        return f"exact gradients against rank-{info['query_rank'] or 'full'} query factors"
    return f"{mode}, projection dim {info['projection_dim'] or '0 (exact)'}"


def _energy_html(energy: dict, query_id: Any) -> str:
    """The share of each method's query vector ``‖u‖²`` its low-rank factors keep (exact mode)."""
    kept = {m: per[query_id] for m, per in energy.items() if query_id in per}
    if not kept:
        return ""
    parts = ", ".join(f"{_e(m)} {v:.3f}" for m, v in kept.items())
    return f'<p class="energy" data-energy="{min(kept.values()):.6f}">query energy kept by the rank: {parts}</p>'


def _skipped_queries_html(info: dict) -> str:
    """``, N skipped (reason n, …)`` after the query count, when the run lists skipped queries."""
    n = info.get("queries_skipped")
    if not n:
        return "" if n is None else ", 0 skipped"
    reasons = ", ".join(f"{r} {c}" for r, c in info["queries_skipped_by_reason"].items())
    return f', <span class="skipped-queries">{n} skipped</span> ({_e(reasons)}; listed in skipped_queries.parquet)'


def render_report(url: str, n_docs: int = DEFAULT_DOCS) -> str:
    """The report page of the run at ``url``, as HTML text.

    Raises:
        ray_influence.inspection.NotARun: ``url`` is not a run directory.
        ray_influence.data.InputError: the run has no results yet.
    """
    from .data import InputError

    run = open_run(url)
    info = describe_run(url)
    methods = info["methods"]
    try:
        queries = _read_table(run, "queries/queries.parquet", verified=True)
    except DamagedArtifact as e:
        raise InputError(str(e)) from None
    results = {m: _read_table(run, f"results/method={m}/part-0.parquet") for m in methods}
    results = {m: r for m, r in results.items() if r is not None}
    if not queries or not results:
        raise InputError(f"run {url!r} has no results yet (run the query and score stages first)")
    by_query: dict = defaultdict(lambda: defaultdict(list))
    for m, rows in results.items():
        for r in rows:
            by_query[r["query_id"]][m].append(r)
    tokens: dict = defaultdict(lambda: defaultdict(list))  # (method, query) -> doc -> [(token, score)]
    layers: dict = defaultdict(lambda: defaultdict(list))  # (method, query) -> doc -> [(block, score)]
    for m in results:
        for r in _read_table(run, method_table_rel("token_influence", m)) or []:
            tokens[(m, r["query_id"])][r["doc_id"]].append((r["token_index"], r["token"], r["score"]))
        for r in _read_table(run, method_table_rel("layer_influence", m)) or []:
            layers[(m, r["query_id"])][r["doc_id"]].append((r["block"], r["score"]))
    for per_doc in tokens.values():
        for doc_id, rows in per_doc.items():
            per_doc[doc_id] = [(t, s) for _, t, s in sorted(rows)]

    stages = "".join(f"<tr><td>{_e(n)}</td><td>{_e(s['status'])}</td><td>{_seconds(s['seconds'])}</td></tr>"
                     for n, s in info["stages"].items())
    links = "".join(f'<a href="#q-{i}">{_e(q["query_id"])}</a>' for i, q in enumerate(queries))
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (
        f"<header><h1>Influence report</h1><table class=\"meta\">"
        f"<tr><th>run</th><td>{_e(info['run_dir'])}</td></tr>"
        f"<tr><th>pre-trained</th><td>{_e(info['pretrained_model'])}</td></tr>"
        f"<tr><th>fine-tuned</th><td>{_e(info['finetuned_model'])}</td></tr>"
        f"<tr><th>methods</th><td>{_e(', '.join(results))}</td></tr>"
        f"<tr><th>documents</th><td>{info['documents']['indexed']} indexed, {info['documents']['skipped']} skipped, "
        f"{info['partitions']['total']} partitions</td></tr>"
        f"<tr><th>queries</th><td>{len(queries)}{_skipped_queries_html(info)}</td></tr>"
        f"<tr><th>scoring</th><td>{_e(_mode_text(info))}</td></tr></table>"
        f'<table class="meta"><tr><th>stage</th><th>status</th><th>time</th></tr>{stages}</table>'
        f'<p class="legend">token shading: <span class="swatch" style="background:rgb{POSITIVE}"></span>raises the score '
        f'(proponent) <span class="swatch" style="background:rgb{NEGATIVE}"></span>lowers it; opacity is the term '
        f"relative to the largest one for that query and method. Generated {generated}.</p>"
        f"<nav>{links}</nav></header>"
    )
    sections = []
    for i, q in enumerate(queries):
        qid = q["query_id"]
        blocks = "".join(_method_html(m, by_query[qid][m], tokens[(m, qid)], layers[(m, qid)], n_docs, j == 0)
                         for j, m in enumerate(results))
        sections.append(
            f'<section class="query" id="q-{i}" data-query-id="{_e(qid)}"><h2>Query {_e(qid)}</h2>'
            f'<div class="qa"><span class="label">prompt</span><pre class="prompt">{_e(q["prompt"])}</pre>'
            f'<span class="label">completion</span><pre class="completion">{_e(q["completion"])}</pre></div>'
            f"{_energy_html(info['query_energy'], qid)}{blocks}</section>"
        )
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Influence report: {_e(info["run_dir"])}'
            f"</title><style>{CSS}</style></head><body>{header}<main>{''.join(sections)}</main></body></html>\n")


def write_report(url: str, out: str | None = None, n_docs: int = DEFAULT_DOCS) -> str:
    """Renders the report and writes it to ``out`` (default ``{run_dir}/report.html``); returns where."""
    page = render_report(url, n_docs).encode()
    if out is None:
        run = RunDir(url)
        run.write_bytes("report.html", page)
        return f"{run.url}/report.html"
    with fsspec.open(out, "wb") as fh:
        fh.write(page)
    return out
