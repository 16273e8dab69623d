"""Faults on real Ray: a worker dying mid-index, damaged artefacts, a bad corpus, NaN rows."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch

from test_job import assert_same_scores  # float64 end to end: SCORE_RTOL of test_job
from world import build_world
from ray_influence.config import config_from_dict
from ray_influence.driver import run_job
from ray_influence.models import load_model, load_tokenizer
from ray_influence.store import factors_rel, index_rel
from ray_influence.worker import CRASH_ONCE_ENV



def results(run_dir: str) -> list[tuple]:
    return duckdb.sql(f"select method, query_id, rank, doc_id, score from read_parquet('{run_dir}/results/**/*.parquet', "
                      "hive_partitioning=true) order by method, query_id, rank").fetchall()


def same_results(a: list[tuple], b: list[tuple]) -> None:
    assert [r[:4] for r in a] == [r[:4] for r in b]
    assert_same_scores(a, b)  # within SCORE_RTOL of the largest |score| of each method and query


def indexed_ids(run_dir: str) -> list:
    ids = []
    for f in sorted((Path(run_dir) / "index" / "pretrained" / "shard-0").glob("*.safetensors")):
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        ids += json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["ray_influence"])["doc_ids"]
    return ids


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("world")
    cfg = build_world(root)
    cfg["scoring"]["methods"] = ["multi_stage", "grad_dot"]
    run_job(config_from_dict(cfg), progress=False)
    return root, cfg


def test_worker_killed_mid_index_gives_identical_results(baseline, tmp_path, monkeypatch):
    root, cfg = baseline
    flag = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(flag))
    faulted = {**cfg, "run_dir": str(tmp_path / "run")}
    summary = run_job(config_from_dict(faulted), progress=False)
    assert flag.exists(), "the fault was not injected"
    assert summary["index"]["partitions"] == 4
    ids = indexed_ids(faulted["run_dir"])
    assert sorted(ids) == list(range(20)), "a document is missing or duplicated in the index"
    same_results(results(faulted["run_dir"]), results(cfg["run_dir"]))


def test_damaged_pieces_are_recomputed_never_scored(baseline, tmp_path):
    root, cfg = baseline
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(cfg["run_dir"], run_dir)
    copy = {**cfg, "run_dir": str(run_dir)}
    pieces = sorted((run_dir / "index" / "pretrained" / "shard-0").glob("*.safetensors"))
    flipped = bytearray(pieces[1].read_bytes())
    flipped[len(flipped) // 2] ^= 0x01  # one bit inside the gradients
    pieces[1].write_bytes(bytes(flipped))
    factors = run_dir / factors_rel("pretrained", 0)
    factors.write_bytes(factors.read_bytes()[:-100])  # truncated
    summary = run_job(config_from_dict(copy), progress=False)
    assert summary["index"]["damaged_recomputed"] == [
        factors_rel("pretrained", 0), index_rel("pretrained", 0, pieces[1].name[: -len(".safetensors")])]
    assert summary["index"]["partitions"] == 1
    assert "fit_pretrained" in summary, "the truncated factors were not refit"
    same_results(results(str(run_dir)), results(cfg["run_dir"]))


def test_bad_corpus_rows_are_skipped_and_listed(baseline, tmp_path):
    root, cfg = baseline
    # The pre-trained model maps unknown words to <unk>; a NaN embedding row for it makes
    # any document with an unknown word non-finite.
    pt = load_model(cfg["pretrained_model"], "float32")
    tok = load_tokenizer(cfg["pretrained_model"])
    with torch.no_grad():
        pt.get_input_embeddings().weight[tok.unk_token_id] = float("nan")
    pt.save_pretrained(tmp_path / "pt_nan")
    tok.save_pretrained(tmp_path / "pt_nan")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.parquet").write_bytes((Path(cfg["corpus"]["path"]) / "part-0.parquet").read_bytes())
    lines = [
        json.dumps({"doc_id": 100, "text": None}),
        json.dumps({"doc_id": 101, "text": ""}),
        json.dumps({"doc_id": 102, "text": "  \t "}),
        json.dumps({"doc_id": 103, "text": 42}),
        json.dumps({"doc_id": 104, "text": " ".join(["red cat"] * 40)}),  # longer than max_length
        json.dumps({"doc_id": 3, "text": "a duplicate id"}),
        json.dumps({"doc_id": 105, "text": "the zebra runs"}),  # 'zebra' is <unk>: NaN
    ]
    (corpus / "z.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"doc_id": 106, "text": "bad \xff utf8"}\n')
    bad = {**cfg, "run_dir": str(tmp_path / "run"), "pretrained_model": str(tmp_path / "pt_nan"),
           "corpus": {**cfg["corpus"], "path": str(corpus)}}
    summary = run_job(config_from_dict(bad), progress=False)
    skipped = dict(duckdb.sql(f"select doc_id, reason from read_parquet('{bad['run_dir']}/skipped.parquet')").fetchall())
    assert skipped == {"100": "missing_text", "101": "empty_text", "102": "empty_text", "103": "not_text",
                       "3": "duplicate_id", "105": "non_finite_gradient", "<z.jsonl row 7>": "invalid_utf8"}, skipped
    assert summary["index"]["truncated"] == 1 and summary["index"]["duplicate_ids"] == 1
    assert summary["index"]["docs"] == 21  # 20 good + the long one
    ranked = {r[3] for r in results(bad["run_dir"])}
    assert 105 not in ranked
    texts = pq.read_table(Path(bad["run_dir"]) / "results").column("doc_text").to_pylist()
    assert "a duplicate id" not in texts, "the second occurrence of doc 3 was scored"
