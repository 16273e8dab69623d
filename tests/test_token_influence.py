"""Per-token and per-layer influence of the top documents: the terms sum to the stored scores.

Also home of :func:`shared_run`, one finished job on the tiny world that the report,
inspect and analyst tests read too (built once per pytest session).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch

from world import build_world, write_corpus_file
from ray_influence.attribution import document_gradients
from ray_influence.config import ConfigError, config_from_dict
from ray_influence.driver import run_job
from ray_influence.models import load_tokenizer
from ray_influence.modules import find_tracked_modules
from ray_influence.projection import make_projection, project_matrix
from ray_influence.scoring import flatten
from ray_influence.token_influence import split_flat, token_terms
from ray_influence.tokens import tokenize_document
from conftest import random_examples
from precision import assert_close

RTOL = 1e-6
TERMS_RTOL = 1e-10  # float64: per-token terms summed vs one inner product, one example (no padding)
TOP = 3
BAD_ROWS = [{"doc_id": 100, "text": ""}, {"doc_id": 101, "text": None}, {"doc_id": 0, "text": "red cat duplicate"}]


def shared_run(tmp_path_factory, request) -> tuple[Path, dict]:
    """A finished run (exact, four methods, per-token influence of the top 3) and its config.

    The corpus has a second file with an empty text, a missing text and a duplicate id, so
    the run has skipped documents of three reasons. Built on first use in a session; Ray
    is started (the ``ray_local`` fixture) only then.
    """
    root = tmp_path_factory.getbasetemp() / "shared-run"
    if not (root / "DONE").exists():
        request.getfixturevalue("ray_local")
        root.mkdir(exist_ok=True)
        cfg = build_world(root)
        cfg["scoring"]["token_influence_top"] = TOP
        write_corpus_file(root / "corpus" / "part-1.parquet", BAD_ROWS)
        run_job(config_from_dict(cfg), progress=False)
        (root / "config.json").write_text(json.dumps(cfg))
        (root / "DONE").touch()
    return root, json.loads((root / "config.json").read_text())


def read_table(run_dir: str, name: str) -> list[dict]:
    return ds.dataset(f"{run_dir}/{name}", format="parquet", partitioning="hive").to_table().to_pylist()


def check_sums(run_dir: str, methods: list[str], top: int, n_queries: int) -> None:
    """Per-token and per-module terms of every (query, top doc) sum to its result score."""
    results = {(r["method"], r["query_id"], r["doc_id"]): r for r in read_table(run_dir, "results")}
    for table in ("token_influence", "layer_influence"):
        sums: dict[tuple, float] = defaultdict(float)
        for r in read_table(run_dir, table):
            sums[(r["method"], r["query_id"], r["doc_id"])] += r["score"]
        assert {k[0] for k in sums} == set(methods)
        for m in methods:
            pairs = [k for k in sums if k[0] == m]
            assert len(pairs) == n_queries * top, (table, m, len(pairs))
            scale = max(abs(results[k]["score"]) for k in pairs)
            for k in pairs:
                assert results[k]["rank"] <= top
                assert sums[k] == pytest.approx(results[k]["score"], rel=RTOL, abs=RTOL * scale), (table, k)


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, request):
    return shared_run(tmp_path_factory, request)


def test_token_terms_sum_to_the_document_gradient_inner_product(model64):
    """Without Ray: Σ_t and Σ_m of the terms equal <u, DW> (exact) and <û, Ĝ> (projected)."""
    specs = find_tracked_modules(model64)
    names = list(specs)
    gen = torch.Generator().manual_seed(0)
    u = {n: torch.randn(3, *s.shape, generator=gen, dtype=torch.float64) for n, s in specs.items()}
    projs = {n: make_projection(s, 4, 0) for n, s in specs.items()}
    u_hat = {n: project_matrix(u[n], projs[n]) for n in names}
    for ex in random_examples(3, seed=1):
        exact = token_terms(model64, ex, specs, u)  # [M, R, T]
        assert exact.shape == (len(specs), 3, len(ex))
        dw = document_gradients(model64, [ex], specs).grads
        # Float64 sums of many terms of both signs: the round-off is relative to |u| |DW|
        # (Cauchy-Schwarz), not to the inner product, which may be near 0.
        fu, fdw = flatten(u, names), flatten(dw, names)[0]
        assert_close(exact.sum((0, 2)), fu @ fdw, TERMS_RTOL, f"{ex.key}: Σ exact terms",
                     scale=float(fu.norm(dim=1).max() * fdw.norm()))
        projected = token_terms(model64, ex, specs, u_hat, projs)
        g_hat = document_gradients(model64, [ex], specs, projs).grads
        fu, fg = flatten(u_hat, names), flatten(g_hat, names)[0]
        assert_close(projected.sum((0, 2)), fu @ fg, TERMS_RTOL, f"{ex.key}: Σ projected terms",
                     scale=float(fu.norm(dim=1).max() * fg.norm()))


def test_split_flat_inverts_flatten():
    shapes = {"a": (2, 3), "b": (4, 1)}
    parts = {n: torch.randn(5, *s) for n, s in shapes.items()}
    back = split_flat(flatten(parts, list(shapes)), shapes)
    for n in shapes:
        assert torch.equal(back[n], parts[n])
    with pytest.raises(ValueError, match="columns"):
        split_flat(torch.zeros(5, 3), shapes)


def test_exact_run_token_terms_sum_to_scores(exact_run):
    root, cfg = exact_run
    check_sums(cfg["run_dir"], cfg["scoring"]["methods"], TOP, 3)


def test_tokens_are_the_documents_tokens(exact_run):
    root, cfg = exact_run
    tok = load_tokenizer(cfg["pretrained_model"])
    text = {r["doc_id"]: r["text"] for r in ds.dataset(f"{root}/corpus/part-0.parquet").to_table().to_pylist()}
    by_doc: dict = defaultdict(list)
    for r in read_table(cfg["run_dir"], "token_influence"):
        if r["method"] == "multi_stage" and r["query_id"] == "q0":
            by_doc[r["doc_id"]].append((r["token_index"], r["token"]))
    assert len(by_doc) == TOP
    for doc_id, toks in by_doc.items():
        ex = tokenize_document(tok, str(doc_id), text[doc_id], cfg["corpus"]["max_length"])
        assert [i for i, _ in toks] == list(range(len(ex)))
        assert [t for _, t in toks] == [tok.decode([i]) for i in ex.input_ids]
        assert toks[-1][1] == tok.eos_token


def test_layer_table_names_modules_and_blocks(exact_run):
    root, cfg = exact_run
    rows = [r for r in read_table(cfg["run_dir"], "layer_influence") if r["method"] == "grad_dot"]
    assert {r["block"] for r in rows} == {0, 1}
    assert all(f".{r['block']}." in r["module"] for r in rows)


def test_projected_run_token_terms_sum_to_projected_scores(tmp_path, ray_local):
    cfg = build_world(tmp_path, n_docs=12)
    cfg["projection"] = {"dim": 4, "seed": 0, "dtype": "float64"}
    cfg["scoring"].update(methods=["multi_stage", "single_stage", "grad_cos"], top_k=4, token_influence_top=2)
    summary = run_job(config_from_dict(cfg), progress=False)
    assert summary["tokens"]["top"] == 2 and "tokens" in summary["timings"]
    check_sums(cfg["run_dir"], ["multi_stage", "single_stage", "grad_cos"], 2, 3)


def test_token_influence_top_must_not_be_negative(tmp_path):
    cfg = build_world(tmp_path, n_docs=2)
    cfg["scoring"]["token_influence_top"] = -1
    with pytest.raises(ConfigError, match="token_influence_top"):
        config_from_dict(cfg)
