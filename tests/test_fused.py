"""``scoring.fused``: the corpus pass scores the queries on the spot and writes no index.

The results must be those of index + score (the same rows, the same scores: the rows are
rounded to ``projection.dtype`` as an index piece stores them), and a rerun for the same
queries must skip the partitions already scored.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_job import results, with_
from world import build_world, corpus_rows, write_config, write_corpus_file
from ray_influence.config import config_from_dict
from ray_influence.driver import run_job
from ray_influence.inspection import describe_run
from ray_influence.worker import CRASH_ONCE_ENV

SCORE_RTOL = 1e-12  # the same float64 sums, in the same order


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("fused")
    cfg = build_world(root)
    cfg["scoring"]["token_influence_top"] = 2
    summary = run_job(config_from_dict(cfg), progress=False)
    return root, cfg, summary


def assert_same(got: list[tuple], want: list[tuple], score_col: int) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g[:score_col] == w[:score_col] and g[score_col + 1:] == w[score_col + 1:], (g, w)
        assert g[score_col] == pytest.approx(w[score_col], rel=SCORE_RTOL, abs=1e-300), (g, w)


def table(run_dir: str, name: str) -> list[tuple]:
    import duckdb

    where = f"{run_dir}/{name}" if name.endswith(".parquet") else f"{run_dir}/{name}/**/*.parquet"
    return duckdb.sql(f"select * from read_parquet('{where}', hive_partitioning=true) order by all").fetchall()


def test_fused_gives_the_results_of_index_and_score_without_an_index(world, tmp_path):
    root, cfg, summary = world
    fused = with_(cfg, run_dir=str(tmp_path / "fused"), scoring__mode="fused")
    got = run_job(config_from_dict(fused), progress=False)
    assert "index" not in got["timings"] and set(got["timings"]) >= {"fit", "query", "score"}
    assert not (Path(fused["run_dir"]) / "index").exists(), "a fused run writes no index"
    corpus = got["score_corpus"]
    assert corpus["partitions"] == corpus["partitions_total"] == summary["index"]["partitions_total"]
    assert (corpus["docs"], corpus["tokens"]) == (summary["index"]["docs"], summary["index"]["tokens"])
    # results: (method, query_id, rank, doc_id, score, doc_text)
    assert_same(results(fused["run_dir"]), results(cfg["run_dir"]), 4)
    for name in ("token_influence", "layer_influence", "skipped.parquet"):
        assert table(fused["run_dir"], name) == table(cfg["run_dir"], name), name


def test_fused_rounds_rows_as_the_index_stores_them(world, tmp_path):
    root, cfg, _ = world
    projected = with_(cfg, run_dir=str(tmp_path / "indexed"), projection={"dim": 4, "seed": 0, "dtype": "bfloat16"},
                      scoring__methods=["multi_stage", "grad_cos"], scoring__token_influence_top=0)
    fused = with_(projected, run_dir=str(tmp_path / "fused"), scoring__mode="fused")
    run_job(config_from_dict(projected), progress=False)
    run_job(config_from_dict(fused), progress=False)
    assert_same(results(fused["run_dir"]), results(projected["run_dir"]), 4)


def test_a_fused_rerun_scores_only_what_it_has_not_scored(world, tmp_path):
    root, cfg, _ = world
    fused = with_(cfg, run_dir=str(tmp_path / "fused"), scoring__mode="fused", scoring__token_influence_top=0,
                  corpus__partition_docs=4)
    first = run_job(config_from_dict(fused), progress=False)
    before = results(fused["run_dir"])
    again = run_job(config_from_dict(fused), progress=False)
    assert first["score_corpus"]["partitions"] == 5 and again["score_corpus"]["partitions"] == 0
    assert results(fused["run_dir"]) == before
    # A lost piece is scored again, and only that one.
    piece = sorted((Path(fused["run_dir"]) / "fused").glob("*/*.safetensors"))[2]
    piece.unlink()
    assert run_job(config_from_dict(fused), progress=False)["score_corpus"]["partitions"] == 1
    assert results(fused["run_dir"]) == before
    # New queries are a new query set: every partition is scored for them.
    qpath = tmp_path / "queries2.jsonl"
    qpath.write_text('{"query_id": "new", "prompt": "the red cat", "completion": " runs in"}\n')
    new = run_job(config_from_dict(with_(fused, queries__path=str(qpath))), progress=False)
    assert new["score_corpus"]["partitions"] == 5
    assert {r[1] for r in results(fused["run_dir"])} == {"new"}


def test_index_stage_of_a_fused_config_exits_2(world, tmp_path):
    root, cfg, _ = world
    fused = with_(cfg, run_dir=str(tmp_path / "never"), scoring__mode="fused")
    path = write_config(tmp_path / "fused.yaml", fused)
    proc = subprocess.run([sys.executable, "-m", "ray_influence.cli", "run", str(path), "--stage", "index"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "scoring.mode" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_fused_over_a_grown_corpus_scores_only_the_new_partitions(world, tmp_path):
    root, cfg, _ = world
    corpus = tmp_path / "corpus"
    write_corpus_file(corpus / "b.parquet", corpus_rows(10, seed=5))
    fused = with_(cfg, run_dir=str(tmp_path / "fused"), corpus__path=str(corpus), corpus__partition_docs=4,
                  scoring__mode="fused", scoring__token_influence_top=0)
    indexed = with_(fused, run_dir=str(tmp_path / "indexed"), scoring__mode="index")
    assert run_job(config_from_dict(fused), progress=False)["score_corpus"]["partitions"] == 3
    run_job(config_from_dict(indexed), progress=False)  # the same factors (fitted on b.parquet) for both
    # a.parquet sorts first: b.parquet's partitions keep their pieces but move to later positions.
    write_corpus_file(corpus / "a.parquet", corpus_rows(6, seed=6, start_id=100))
    assert run_job(config_from_dict(fused), progress=False)["score_corpus"]["partitions"] == 2
    run_job(config_from_dict(indexed), progress=False)
    assert_same(results(fused["run_dir"]), results(indexed["run_dir"]), 4)
    info = describe_run(fused["run_dir"])
    assert info["stages"]["index"]["status"] == "fused: done" and info["documents"]["indexed"] == 16


def test_a_worker_killed_mid_fused_pass_gives_identical_results(world, tmp_path, monkeypatch):
    root, cfg, _ = world
    flag = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(flag))
    fused = with_(cfg, run_dir=str(tmp_path / "fused"), scoring__mode="fused")
    summary = run_job(config_from_dict(fused), progress=False)
    assert flag.exists(), "the fault was not injected"
    assert summary["score_corpus"]["partitions"] == summary["score_corpus"]["partitions_total"]
    assert_same(results(fused["run_dir"]), results(cfg["run_dir"]), 4)
