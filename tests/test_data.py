"""Corpus inputs over fsspec: files, directories, globs; Parquet, JSONL, Arrow; partitions."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from ray_influence.data import InputError, list_files, plan_partitions, read_partition, read_records

ROWS = [{"doc_id": i, "text": f"doc number {i}"} for i in range(7)]


def write_all_formats(root):
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), root / "a.parquet")
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[3:5]))
    feather.write_feather(pa.Table.from_pylist(ROWS[5:]), root / "c.arrow")


def read_all(url, partition_docs=2):
    parts = plan_partitions(list_files(url), partition_docs)
    docs = []
    for p in parts:
        docs += read_partition(p, "doc_id", "text")[0]
    return parts, docs


def test_directory_of_mixed_formats(tmp_path):
    write_all_formats(tmp_path / "corpus")
    parts, docs = read_all(str(tmp_path / "corpus"))
    assert [d.doc_id for d in docs] == list(range(7))
    assert [d.position for d in docs] == list(range(7))
    assert [len(p) for p in parts] == [2, 1, 2, 2]


def test_glob_and_single_file_and_file_url(tmp_path):
    write_all_formats(tmp_path / "corpus")
    assert [f.rel for f in list_files(str(tmp_path / "corpus" / "*.parquet"))] == ["a.parquet"]
    _, docs = read_all(f"file://{tmp_path}/corpus/b.jsonl")
    assert [d.doc_id for d in docs] == [3, 4]


def test_partition_keys_survive_new_files(tmp_path):
    write_all_formats(tmp_path / "corpus")
    before = {p.key for p in plan_partitions(list_files(str(tmp_path / "corpus")), 2)}
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "corpus" / "d.parquet")
    after = {p.key for p in plan_partitions(list_files(str(tmp_path / "corpus")), 2)}
    assert before < after and len(after - before) == 4
    assert all(k.replace("-", "").replace("_", "").isalnum() for k in after)


def test_bad_rows_are_skipped_with_reasons(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"doc_id": 1, "text": "fine"}), json.dumps({"doc_id": 2, "text": None}),
             json.dumps({"doc_id": 3, "text": ""}), json.dumps({"doc_id": 4, "text": "   "}),
             json.dumps({"doc_id": 5, "text": 17}), json.dumps({"text": "no id"})]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"doc_id": 6, "text": "\xff\xfe"}\n' + b"{not json\n")
    parts = plan_partitions(list_files(str(path)), 100)
    docs, skipped = read_partition(parts[0], "doc_id", "text")
    assert [d.doc_id for d in docs] == [1]
    reasons = [r for _, r in skipped]
    assert reasons == ["missing_text", "empty_text", "empty_text", "not_text", "missing_id", "invalid_utf8",
                       "invalid_json"]


def test_missing_inputs_and_columns(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_files(str(tmp_path / "nothing.parquet"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown format"):
        list_files(str(tmp_path / "x.csv"))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    with pytest.raises(InputError, match="'body'"):
        read_records(str(tmp_path / "a.parquet"), ["doc_id", "body"])
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": 1}) + "\n")
    with pytest.raises(InputError, match="'prompt'"):
        read_records(str(tmp_path / "q.jsonl"), ["prompt"])
