"""Input formats with the config's column mapping: Parquet (file, directory, glob), JSONL,
Arrow (IPC file and stream), and Hugging Face ``datasets`` directories (``save_to_disk``).
A missing column is an InputError naming it, in every format, and exit code 2 from the CLI.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import yaml

from ray_influence.cli import main
from ray_influence.config import config_from_dict
from ray_influence.data import InputError, check_columns, list_files, plan_partitions, read_partition, read_records
from ray_influence.preflight import check_finetune_data, check_queries
from ray_influence.query_input import load_queries
from ray_influence.toy import word_tokenizer
from ray_influence.worker import ReplicaActor as Worker

CORPUS = [{"key": f"d{i}", "body": f"text of document {i}", "text": None} for i in range(5)]
PAIRS = [{"qid": f"q{i}", "instruction": f"question {i}", "response": f" answer {i}"} for i in range(4)]
FORMATS = ("parquet_file", "parquet_dir", "parquet_glob", "jsonl", "arrow_file", "arrow_stream",
           "datasets_dir", "datasets_dict")


def write(fmt: str, rows: list[dict], root) -> str:
    """Writes ``rows`` (split in two where the format has several files); returns the path to give."""
    root.mkdir(parents=True, exist_ok=True)
    halves = [rows[: len(rows) // 2 + 1], rows[len(rows) // 2 + 1 :]]
    if fmt == "parquet_file":
        pq.write_table(pa.Table.from_pylist(rows), root / "data.parquet")
        return str(root / "data.parquet")
    if fmt in ("parquet_dir", "parquet_glob"):
        for i, half in enumerate(halves):
            (root / "sub").mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(half), root / "sub" / f"part-{i}.parquet")
        (root / "sub" / "README.md").write_text("not data")
        return str(root / "sub") if fmt == "parquet_dir" else str(root / "sub" / "part-*.parquet")
    if fmt == "jsonl":
        (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(root / "data.jsonl")
    if fmt == "arrow_file":
        feather.write_feather(pa.Table.from_pylist(rows), root / "data.arrow")
        return str(root / "data.arrow")
    if fmt == "arrow_stream":
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(root / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        return str(root / "data.arrow")
    import datasets

    datasets.disable_progress_bars()
    if fmt == "datasets_dir":
        datasets.Dataset.from_list(rows).save_to_disk(str(root / "ds"), num_shards=2)
    else:  # a DatasetDict: one folder per split; splits read in name order (a_first, then b_second)
        datasets.DatasetDict({"b_second": datasets.Dataset.from_list(halves[1]),
                              "a_first": datasets.Dataset.from_list(halves[0])}).save_to_disk(str(root / "ds"))
    return str(root / "ds")


@pytest.mark.parametrize("fmt", FORMATS)
def test_corpus_columns_are_mapped(fmt, tmp_path):
    url = write(fmt, CORPUS, tmp_path)
    files = list_files(url)
    assert all(f.format in ("parquet", "jsonl", "arrow") for f in files)
    if fmt.startswith("datasets"):
        assert all(f.rel.endswith(".arrow") for f in files)  # state.json / dataset_info.json are not data
    docs = []
    for part in plan_partitions(files, 2):
        got, skipped = read_partition(part, "key", "body")
        docs += got
        assert skipped == []
    assert [(d.doc_id, d.text) for d in docs] == [(r["key"], r["body"]) for r in CORPUS]
    assert [d.position for d in docs] == list(range(len(CORPUS)))
    # The default text column holds nulls here: every row is skipped as missing_text.
    skipped = [s for part in plan_partitions(files, 2) for s in read_partition(part, "key", "text")[1]]
    assert skipped == [(r["key"], "missing_text") for r in CORPUS]


@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_completion_and_id_columns_are_mapped(fmt, tmp_path):
    url = write(fmt, PAIRS, tmp_path)
    rows = read_records(url, ["qid", "instruction", "response"])
    assert rows == PAIRS
    cfg = config_from_dict({
        "run_dir": str(tmp_path / "run"), "pretrained_model": "pt", "finetuned_model": "ft",
        "corpus": {"path": url, "id_column": "qid", "text_column": "instruction"},
        "finetune_data": {"path": url, "prompt_column": "instruction", "completion_column": "response"},
        "queries": {"path": url, "id_column": "qid", "prompt_column": "instruction", "completion_column": "response"},
    })
    tok = word_tokenizer([r["instruction"] + r["response"] for r in PAIRS])
    check_queries(cfg, tok)
    assert load_queries(cfg.queries, tok).records == tuple(PAIRS)
    check_finetune_data(cfg)
    worker = Worker(cfg)  # models load lazily: reading data needs none
    assert [(r["instruction"], r["response"]) for r in worker.finetune_records()] == \
        [(r["instruction"], r["response"]) for r in PAIRS]
    part = plan_partitions(list_files(url), 100)[0]
    assert [d.doc_id for d in worker.corpus_documents(part)[0]][:2] == ["q0", "q1"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_column_names_it(fmt, tmp_path):
    url = write(fmt, CORPUS, tmp_path)
    for f in list_files(url):
        with pytest.raises(InputError, match="'content'"):
            check_columns(f, ["key", "content"])
    with pytest.raises(InputError, match="'content'"):
        read_records(url, ["key", "content"])


def test_datasets_dir_without_the_text_column_exits_2_before_anything_is_written(tmp_path, capsys):
    url = write("datasets_dir", CORPUS, tmp_path / "data")
    cfg = {"run_dir": str(tmp_path / "run"), "pretrained_model": str(tmp_path / "pt"),
           "finetuned_model": str(tmp_path / "ft"),
           "corpus": {"path": url, "id_column": "key", "text_column": "content"},
           "finetune_data": {"path": url}, "queries": {"path": url}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "'content'" in err and "not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_datasets_state_listing_a_missing_shard_is_an_input_error(tmp_path):
    url = write("datasets_dir", CORPUS, tmp_path)
    (tmp_path / "ds" / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(InputError, match="data-00001-of-00002.arrow"):
        list_files(url)
