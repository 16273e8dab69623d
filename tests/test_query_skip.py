"""Degenerate queries on real Ray: skipped and listed, the rest scored; exit 2 only when none is left."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch

from world import build_world, write_config
from ray_influence.cli import main
from ray_influence.config import config_from_dict
from ray_influence.driver import run_job
from ray_influence.models import load_model, load_tokenizer

SCORE_RTOL = 1e-9  # float64: the same queries give the same scores, whatever else the file holds

GOOD = [
    {"query_id": "q0", "prompt": "the red cat", "completion": " runs in"},
    {"query_id": "q1", "prompt": "a big dog", "completion": " sits on"},
    {"query_id": "q3", "prompt": "the old bird", "completion": " sings"},
    {"query_id": "q4", "prompt": "a small town", "completion": " on the hill"},
]
EMPTY = {"query_id": "q2", "prompt": "the river", "completion": ""}


def write_queries(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def with_queries(cfg: dict, path: str, **changes) -> dict:
    out = copy.deepcopy(cfg)
    out["queries"] = {"path": path}
    out.update(changes)
    return out


def results(run_dir: str) -> list[tuple]:
    return duckdb.sql(f"select method, query_id, rank, doc_id, score from read_parquet('{run_dir}/results/**/*.parquet', "
                      "hive_partitioning=true) order by method, query_id, rank").fetchall()


def skipped_queries(run_dir: str) -> list[tuple]:
    return [tuple(r.values()) for r in pq.read_table(Path(run_dir) / "skipped_queries.parquet").to_pylist()]


def same_results(a: list[tuple], b: list[tuple]) -> None:
    assert [r[:4] for r in a] == [r[:4] for r in b]
    for x, y in zip(a, b):
        assert x[4] == pytest.approx(y[4], rel=SCORE_RTOL)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """A finished run over the four good queries: the reference every other query file is held to."""
    root = tmp_path_factory.mktemp("world")
    cfg = build_world(root)
    cfg["scoring"] = {"methods": ["multi_stage", "grad_dot"], "top_k": 5, "token_influence_top": 2,
                     "mode": "index"}  # reruns reuse the index; new query files do not need a new corpus pass
    cfg = with_queries(cfg, write_queries(root / "good.jsonl", GOOD))
    summary = run_job(config_from_dict(cfg), progress=False)
    assert summary["query"]["queries"] == 4 and summary["query"]["skipped"] == 0
    return root, cfg, results(cfg["run_dir"])


def test_one_empty_completion_of_five_is_skipped_and_the_four_are_scored(world, tmp_path, capsys):
    """The tests of this module share the world's run_dir; each holds the results to the reference."""
    root, cfg, reference = world
    five = with_queries(cfg, write_queries(tmp_path / "five.jsonl", GOOD[:2] + [EMPTY] + GOOD[2:]))
    summary = run_job(config_from_dict(five), progress=False)  # the same run_dir: factors and index are reused
    assert summary["index"]["partitions"] == 0
    q = summary["query"]
    assert (q["queries"], q["skipped"], q["skipped_by_reason"]) == (4, 1, {"empty_completion": 1})
    assert skipped_queries(cfg["run_dir"]) == [("q2", "empty_completion")]
    same_results(results(cfg["run_dir"]), reference)
    stored = pq.read_table(Path(cfg["run_dir"]) / "queries" / "queries.parquet").column("query_id").to_pylist()
    assert stored == ["q0", "q1", "q3", "q4"], "the kept queries, in file order"
    tokens = duckdb.sql(f"select distinct query_id from read_parquet('{cfg['run_dir']}/token_influence/**/*.parquet')"
                        " order by 1").fetchall()
    assert [t for (t,) in tokens] == ["q0", "q1", "q3", "q4"]
    # inspect and the report show the count.
    capsys.readouterr()
    assert main(["inspect", cfg["run_dir"]]) == 0
    out = capsys.readouterr().out
    assert "queries    4, 1 skipped" in out
    lines = out.splitlines()
    assert lines[lines.index("skipped queries by reason") + 1].split() == ["empty_completion", "1"]
    assert main(["inspect", cfg["run_dir"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["queries"], info["queries_skipped"], info["queries_skipped_by_reason"]) == (
        4, 1, {"empty_completion": 1})
    assert main(["report", cfg["run_dir"], "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert '<span class="skipped-queries">1 skipped</span> (empty_completion 1' in page
    assert 'data-query-id="q2"' not in page and page.count('class="query"') == 4
    # A rerun over a clean file replaces the list: nothing skipped now.
    run_job(config_from_dict(cfg), progress=False)
    assert skipped_queries(cfg["run_dir"]) == []
    same_results(results(cfg["run_dir"]), reference)


def test_duplicate_query_ids_keep_the_first_and_list_the_later_ones(world, tmp_path):
    root, cfg, reference = world
    later_q0 = {**GOOD[0], "completion": " eats the dog"}
    later_q1 = {**GOOD[1], "prompt": "the blue hill"}
    rows = [GOOD[0], GOOD[1], later_q0, GOOD[2], later_q1, GOOD[3], later_q0]
    dup = with_queries(cfg, write_queries(tmp_path / "dup.jsonl", rows))
    summary = run_job(config_from_dict(dup), progress=False)
    assert summary["query"]["queries"] == 4 and summary["query"]["skipped_by_reason"] == {"duplicate_id": 3}
    assert skipped_queries(cfg["run_dir"]) == [("q0", "duplicate_id"), ("q1", "duplicate_id"),
                                               ("q0", "duplicate_id")]
    same_results(results(cfg["run_dir"]), reference)  # the first rows' answers were attributed
    stored = pq.read_table(Path(cfg["run_dir"]) / "queries" / "queries.parquet").to_pylist()
    assert stored == GOOD


def test_sharded_replicas_score_the_same_kept_queries(world, tmp_path):
    """Shard 0 selects; its peers get the kept ids and records, so their columns line up."""
    root, cfg, reference = world
    rows = [GOOD[0], EMPTY, GOOD[1], {**GOOD[0], "completion": " sits"}, GOOD[2], GOOD[3]]
    sharded = with_queries(cfg, write_queries(tmp_path / "mixed.jsonl", rows), run_dir=str(tmp_path / "run"))
    sharded["cluster"] = {**cfg["cluster"], "replicas": 1, "shards": 2, "num_cpus_per_worker": 0.5}
    sharded["scoring"] = {**cfg["scoring"], "query_block": 3}  # the query stage in blocks of 3 + 1
    summary = run_job(config_from_dict(sharded), progress=False)
    assert summary["query"]["queries"] == 4 and summary["query"]["query_blocks"] == 2
    assert skipped_queries(sharded["run_dir"]) == [("q2", "empty_completion"), ("q0", "duplicate_id")]
    got = results(sharded["run_dir"])
    assert [r[:4] for r in got] == [r[:4] for r in reference]
    for x, y in zip(got, reference):
        assert x[4] == pytest.approx(y[4], rel=1e-8)


def test_a_query_with_a_non_finite_loss_is_skipped_and_listed(world, tmp_path):
    root, cfg, reference = world
    # The fine-tuned model maps unknown words to <unk>; a NaN embedding row for it makes any
    # query with an unknown word non-finite at the fine-tuned model (and nowhere else).
    ft = load_model(cfg["finetuned_model"], "float32")
    tok = load_tokenizer(cfg["finetuned_model"])
    with torch.no_grad():
        ft.get_input_embeddings().weight[tok.unk_token_id] = float("nan")
    ft.save_pretrained(tmp_path / "ft_nan")
    tok.save_pretrained(tmp_path / "ft_nan")
    rows = GOOD[:1] + [{"query_id": "zebra", "prompt": "the red cat", "completion": " zebra"}] + GOOD[1:]
    bad = with_queries(cfg, write_queries(tmp_path / "nan.jsonl", rows), run_dir=str(tmp_path / "run"),
                       finetuned_model=str(tmp_path / "ft_nan"))
    bad["scoring"] = {**cfg["scoring"], "methods": ["grad_dot"],  # the NaN row touches no fine-tuning example
                      "query_block": 2}  # zebra in the first of 3 blocks
    summary = run_job(config_from_dict(bad), progress=False)
    assert summary["query"]["queries"] == 4 and summary["query"]["query_blocks"] == 3
    assert skipped_queries(bad["run_dir"]) == [("zebra", "non_finite_loss")]
    same_results(results(bad["run_dir"]), [r for r in reference if r[0] == "grad_dot"])


def cli_run(cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = write_config(tmp_path / "cfg.yaml", cfg)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "ray_influence.cli", "run", str(path), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("what", ["all_skipped", "no_rows"])
def test_nothing_left_to_attribute_exits_2_and_writes_nothing(world, tmp_path, what):
    root, cfg, _ = world
    rows = {"all_skipped": [EMPTY, {**GOOD[0], "completion": "  \n"}, {**GOOD[1], "query_id": None},
                            {**EMPTY, "completion": " runs"}],
            "no_rows": []}[what]
    bad = with_queries(cfg, write_queries(tmp_path / "q.jsonl", rows), run_dir=str(tmp_path / "never"))
    proc = cli_run(bad, tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ray-influence: error: queries "), err
    if what == "all_skipped":
        assert "nothing to attribute, every one of the 4 queries is skipped (missing_id: 1 " in err, err
        assert "duplicate_id: 1 (e.g. 'q2'), empty_completion: 2 (e.g. 'q2')" in err, err
    else:
        assert "hold no rows" in err, err
    assert not (tmp_path / "never").exists(), "something was written"
