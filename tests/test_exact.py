"""``scoring.mode: exact`` (the default): exact document gradients against low-rank queries.

At full rank the results, token and layer tables must be those of an exact index + score
(``projection.dim: 0``); at rank ``r`` the scores must be a dense computation with each
module's rank-``r`` query vector; the two sides of the cost model must agree; and a rerun
must score only what is missing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_job import results, with_
from world import build_world, write_config
from ray_influence import attribution, lowrank
from ray_influence.cli import main as cli_main
from ray_influence.collectors import GradientCollector, QueryScoreCollector
from ray_influence.config import config_from_dict
from ray_influence.driver import run_job
from ray_influence.factors_io import factors_from_bytes
from ray_influence.models import load_model, load_tokenizer
from ray_influence.modules import find_tracked_modules
from ray_influence.passes import Labels
from ray_influence.rundir import RunDir
from ray_influence.scoring import Method, query_vectors
from ray_influence.store import factors_rel
from ray_influence.tokens import tokenize_document, tokenize_prompt_completion
from ray_influence.worker import CRASH_ONCE_ENV

# float64 end to end, but the scores are summed in another order than the index path's
# (per module and token, then over modules, against one dot product of flat rows): each
# score is a sum of ~1e3 products, so round-off is ~1e3 * 1e-16 relative to the largest
# term; 1e-9 leaves room for cancellation of terms ~1e4 larger than the sum.
SCORE_RTOL = 1e-9


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """The test world scored by an exact index (dim 0) + score: the reference of the exact pass."""
    root = tmp_path_factory.mktemp("exact")
    cfg = build_world(root, layers=2)
    cfg["scoring"]["token_influence_top"] = 2
    run_job(config_from_dict(cfg), progress=False)
    return root, cfg


def exact(cfg: dict, run_dir: Path, rank: int = 0, **changes) -> dict:
    out = with_(cfg, run_dir=str(run_dir), scoring__mode="exact", scoring__query_rank=rank, **changes)
    return out


def assert_same(got: list[tuple], want: list[tuple], score_col: int) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g[:score_col] == w[:score_col] and g[score_col + 1:] == w[score_col + 1:], (g, w)
        assert g[score_col] == pytest.approx(w[score_col], rel=SCORE_RTOL, abs=1e-300), (g, w)


def table(run_dir: str, name: str, order: str) -> list[tuple]:
    import duckdb

    return duckdb.sql(f"select * from read_parquet('{run_dir}/{name}/**/*.parquet', hive_partitioning=true) "
                      f"order by {order}").fetchall()


TABLES = {"results": ("method, query_id, rank", 4), "token_influence": ("method, query_id, doc_id, token_index", 4),
          "layer_influence": ("method, query_id, doc_id, module", 4)}


@pytest.mark.parametrize("shards, block", [(1, 0), (1, 2), (2, 1)])
def test_full_rank_gives_the_exact_index_results(world, tmp_path, shards, block):
    """Also with the query stage in blocks of ``block`` queries (0: all 3 at once, by memory)."""
    root, cfg = world
    run = exact(cfg, tmp_path / "exact", cluster__shards=shards, scoring__query_block=block,
                cluster__num_cpus_per_worker=0.5 if shards > 1 else 1, cluster__replicas=1 if shards > 1 else 2)
    summary = run_job(config_from_dict(run), progress=False)
    assert summary["query"]["query_blocks"] == {0: 1, 2: 2, 1: 3}[block]
    assert not (Path(run["run_dir"]) / "index").exists(), "the exact pass writes no index"
    assert summary["query"]["query_rank"] == 0 and summary["query"]["rank_clipped"] == []
    for m, e in summary["query"]["retained_energy"].items():
        assert e["min"] == pytest.approx(1.0, abs=1e-12), (m, e)  # full rank keeps every direction
    for name, (order, col) in TABLES.items():
        got, want = table(run["run_dir"], name, order), table(cfg["run_dir"], name, order)
        if name == "results":
            assert_same(got, want, 3)  # (query_id, rank, doc_id, score, doc_text, method)
        else:
            assert_same(got, want, col)


def dense_reference(cfg: dict, run_dir: str, rank: int) -> tuple[dict, dict]:
    """``({method: [Q, N] scores with numpy's rank-r u}, {(method, q, module): retained energy})``."""
    import pyarrow.parquet as pq

    pt, ft = load_model(cfg["pretrained_model"], "float64"), load_model(cfg["finetuned_model"], "float64")
    tok = load_tokenizer(cfg["pretrained_model"])
    rows = pq.read_table(Path(cfg["corpus"]["path"]) / "part-0.parquet").to_pylist()
    docs = [tokenize_document(tok, str(r["doc_id"]), r["text"], cfg["corpus"]["max_length"]) for r in rows]
    q_rows = [json.loads(line) for line in Path(cfg["queries"]["path"]).read_text().splitlines()]
    q_ex = [tokenize_prompt_completion(tok, r["query_id"], r["prompt"], r["completion"], 512, False) for r in q_rows]
    specs = find_tracked_modules(pt)
    run = RunDir(run_dir)
    f_pt = factors_from_bytes(run.read_piece(factors_rel("pretrained", 0)))[0]
    f_ft = factors_from_bytes(run.read_piece(factors_rel("finetuned", 0)))[0]
    d = {"pretrained": attribution.document_gradients(pt, docs, specs).grads,
         "finetuned": attribution.document_gradients(ft, docs, specs).grads}
    g_q = attribution.document_gradients(ft, q_ex, specs).grads
    scores, energy = {}, {}
    for m in cfg["scoring"]["methods"]:
        method = Method.parse(m)
        u = query_vectors(method, g_q, f_ft, f_pt)
        total = torch.zeros(len(q_rows), len(docs), dtype=torch.float64)
        for n in specs:
            for q in range(len(q_rows)):
                p, s, vh = np.linalg.svd(u[n][q].numpy(), full_matrices=False)
                r = min(rank, len(s))
                u_r = torch.from_numpy((p[:, :r] * s[:r]) @ vh[:r])
                total[q] += torch.einsum("oi,noi->n", u_r, d[method.doc_model][n])
                energy[(m, q_rows[q]["query_id"], n)] = float((s[:r] ** 2).sum() / (s ** 2).sum())
        if method.cosine:  # the full query's norm and the exact document norm
            qn = torch.cat([u[n].flatten(1) for n in specs], 1).norm(dim=1)
            dn = torch.cat([d["pretrained"][n].flatten(1) for n in specs], 1).norm(dim=1)
            total = total / (qn[:, None] * dn[None, :])
        scores[m] = total
    return scores, energy


def test_rank_r_scores_are_a_dense_computation_with_the_rank_r_query(world, tmp_path):
    import duckdb

    root, cfg = world
    rank = 3
    run = exact(cfg, tmp_path / "r3", rank=rank, scoring__top_k=20)  # every document of the corpus
    summary = run_job(config_from_dict(run), progress=False)
    want, energy = dense_reference(cfg, run["run_dir"], rank)
    got = results(run["run_dir"])  # (method, query_id, rank, doc_id, score, doc_text)
    q_index = {f"q{i}": i for i in range(3)}
    assert {g[0] for g in got} == set(cfg["scoring"]["methods"])
    for m, q, r, doc, score, _ in got:
        ref = float(want[m][q_index[q], doc])  # doc ids are 0..N-1 in corpus order
        assert score == pytest.approx(ref, rel=SCORE_RTOL, abs=1e-14), (m, q, r, doc, score, ref)
    for m in cfg["scoring"]["methods"]:  # the ranking is the reference's, ties apart
        mine = [g[3] for g in got if g[0] == m and g[1] == "q0"]
        ref = torch.argsort(want[m][0], descending=True, stable=True).tolist()
        assert mine == ref[:len(mine)], m
    table = duckdb.sql(f"select method, query_id, module, rank, retained_energy from "
                       f"read_parquet('{run['run_dir']}/query_energy.parquet')").fetchall()
    assert len(table) == len(energy) > 0
    for m, q, n, r, e in table:
        assert r == rank and e == pytest.approx(energy[(m, q, n)], rel=1e-10), (m, q, n)
    assert 0 < summary["query"]["retained_energy"]["multi_stage"]["min"] < 1


def test_both_sides_of_the_cost_model_give_the_same_scores(model64, arch):
    """Forced low-rank contraction, forced formed DW, and the cost model's own choice agree with DW."""
    from conftest import random_examples
    from ray_influence.passes import run_pass
    from ray_influence.tokens import collate

    specs = find_tracked_modules(model64)
    batch = collate(random_examples(5, seed=3, prompt_len=2))
    gen = torch.Generator().manual_seed(0)
    factors = {n: lowrank.truncate(torch.randn(4, *s.shape, generator=gen, dtype=torch.float64), 3)
               for n, s in specs.items()}
    grads = GradientCollector(specs)
    run_pass(model64, batch, specs, grads, Labels.DATA)
    dw = grads.result()
    want = sum(torch.einsum("qoi,noi->nq", lowrank.dense(factors[n]), dw[n]) for n in specs)
    want_sq = sum(dw[n].square().sum((1, 2)) for n in specs)
    sides = {}
    for force in ("low_rank", "dense", None):
        col = QueryScoreCollector(factors, force=force)
        run_pass(model64, batch, specs, col, Labels.DATA)
        s, sq = col.result()
        sides[force] = {side for v in col.sides.values() for side in v}
        # float64 end to end (Bloom: a float32 softmax in its HF forward moves g, but both
        # sides contract the same g): sums of ~1e2 products in another order.
        torch.testing.assert_close(s, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
        torch.testing.assert_close(sq, want_sq, rtol=1e-10, atol=0)
    assert sides["low_rank"] == {"low_rank"} and sides["dense"] == {"dense"}


def test_cost_model_and_gram_norms():
    # a 512-wide module at rank 16: 16 queries form DW on long documents only
    assert not lowrank.forms_gradient(32, 513, 512, 16, 16)
    assert lowrank.forms_gradient(4096, 513, 512, 64, 16)
    a = torch.randn(3, 7, 5, dtype=torch.float64)
    g = torch.randn(3, 7, 4, dtype=torch.float64)
    dw = torch.bmm(g.transpose(1, 2), a)
    torch.testing.assert_close(lowrank.gram_sqnorms(a, g), dw.square().sum((1, 2)), rtol=1e-12, atol=0)
    f = lowrank.truncate(torch.randn(2, 4, 5, dtype=torch.float64), 0)
    assert f.rank == 4 and torch.allclose(f.kept, f.sqnorm)
    assert lowrank.truncate(torch.randn(2, 4, 5, dtype=torch.float64), 99).rank == 4  # clipped


def test_a_rerun_scores_only_what_is_missing_and_a_killed_worker_changes_nothing(world, tmp_path, monkeypatch):
    root, cfg = world
    run = exact(cfg, tmp_path / "resume", rank=4, scoring__token_influence_top=0)
    first = run_job(config_from_dict(run), progress=False)
    before = results(run["run_dir"])
    assert first["score_corpus"]["partitions"] == first["score_corpus"]["partitions_total"] == 4
    assert run_job(config_from_dict(run), progress=False)["score_corpus"]["partitions"] == 0
    assert results(run["run_dir"]) == before
    piece = sorted((Path(run["run_dir"]) / "fused").glob("*/*.safetensors"))[1]
    piece.unlink()
    assert run_job(config_from_dict(run), progress=False)["score_corpus"]["partitions"] == 1
    assert results(run["run_dir"]) == before
    flag = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(flag))
    crashed = with_(run, run_dir=str(tmp_path / "crashed-run"))
    summary = run_job(config_from_dict(crashed), progress=False)
    assert flag.exists(), "the fault was not injected"
    assert summary["score_corpus"]["partitions"] == summary["score_corpus"]["partitions_total"]
    got = results(crashed["run_dir"])
    assert [g[:4] for g in got] == [b[:4] for b in before]
    for g, b in zip(got, before):
        assert g[4] == pytest.approx(b[4], rel=SCORE_RTOL), (g, b)


@pytest.mark.parametrize("bad, words", [({"query_rank": -1}, "scoring.query_rank"),
                                        ({"query_rank": 2.5}, "scoring.query_rank"),
                                        ({"query_rank": True}, "scoring.query_rank"),
                                        ({"query_block": -2}, "scoring.query_block"),
                                        ({"mode": "sketch"}, "scoring.mode")])
def test_bad_mode_or_rank_exits_2_and_writes_nothing(tmp_path, capsys, bad, words):
    cfg = build_world(tmp_path)
    cfg["run_dir"] = str(tmp_path / "never")
    cfg["scoring"] = {**cfg["scoring"], **bad}
    path = write_config(tmp_path / "bad.yaml", cfg)
    capsys.readouterr()  # building the world logs to stderr
    assert cli_main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "never").exists()


def test_a_config_with_only_paths_runs_the_exact_mode(tmp_path, ray_local):
    cfg = build_world(tmp_path)
    paths = {k: cfg[k] for k in ("run_dir", "pretrained_model", "finetuned_model")}
    paths.update({k: {"path": cfg[k]["path"]} for k in ("corpus", "finetune_data", "queries")})
    parsed = config_from_dict(copy.deepcopy(paths))
    assert parsed.scoring.mode == "exact" and parsed.scoring.query_rank == 16
    summary = run_job(parsed, progress=False)
    assert "index" not in summary and summary["score_corpus"]["docs"] == 20
    assert not (Path(paths["run_dir"]) / "index").exists()
    assert (Path(paths["run_dir"]) / "query_energy.parquet").exists()
    from ray_influence.inspection import describe_run, format_run
    from ray_influence.report import render_report

    info = describe_run(paths["run_dir"])
    assert info["mode"] == "exact" and info["stages"]["index"]["status"] == "exact: done"
    assert set(info["query_energy"]["multi_stage"]) == {"q0", "q1", "q2"}
    assert all(0 < v <= 1 + 1e-12 for v in info["query_energy"]["multi_stage"].values())
    assert "query energy kept at rank 16" in format_run(info)
    page = render_report(paths["run_dir"])
    assert page.count('class="energy"') == 3 and "rank-16 query factors" in page


def test_gradient_similarity_alone_fits_no_factors(tmp_path, ray_local):
    cfg = build_world(tmp_path)
    cfg["scoring"] = {"methods": ["grad_dot", "grad_cos"], "top_k": 3}
    summary = run_job(config_from_dict(cfg), progress=False)
    assert not any(k.startswith("fit_") for k in summary), "grad_dot / grad_cos need no EK-FAC factors"
    assert not (Path(cfg["run_dir"]) / "factors").exists()
    from ray_influence.inspection import describe_run

    assert describe_run(cfg["run_dir"])["stages"]["fit"]["status"] == "not needed"
    single = with_(cfg, run_dir=str(tmp_path / "single"), scoring__methods=["single_stage"])
    summary = run_job(config_from_dict(single), progress=False)
    assert "fit_finetuned" in summary and "fit_pretrained" not in summary  # single_stage: H_ft only


def test_query_block_size_keeps_a_block_under_the_budget():
    # P = 1000 tracked weights, 2 methods: 1000 * 8 * (2 + 2) = 32 kB per query
    assert lowrank.query_block_size(100, 1000, 2, budget=32_000 * 10) == 10
    assert lowrank.query_block_size(100, 1000, 2, budget=32_000 * 10 - 1) == 9
    assert lowrank.query_block_size(5, 1000, 2, budget=1 << 40) == 5      # never more than the queries
    assert lowrank.query_block_size(100, 10 ** 12, 4, budget=1 << 30) == 1  # never less than one


def test_factors_of_query_blocks_concatenate_to_the_factors_of_all():
    u = torch.randn(5, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole, parts = lowrank.truncate(u, 2), [lowrank.truncate(u[:2], 2), lowrank.truncate(u[2:], 2)]
    joined = lowrank.concat(parts)
    for f in ("left", "right", "sqnorm", "kept"):
        assert torch.equal(getattr(joined, f), getattr(whole, f)), f  # a batched SVD is per matrix
