"""Bad configs and inputs: exit code 2, one clear message, nothing written (DESIGN.md §5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from world import build_world, write_config
from ray_influence.cli import main
from ray_influence.rundir import RunDir, safe_name
from ray_influence.toy import tiny_model, word_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, build_world(root)


def run_cli(tmp_path, cfg: dict, capsys) -> tuple[int, str]:
    path = write_config(tmp_path / "cfg.yaml", cfg)
    capsys.readouterr()  # drop what building the fixtures printed
    rc = main(["run", str(path), "--no-progress"])
    return rc, capsys.readouterr().err


def expect_exit_2(tmp_path, cfg, capsys, needle: str) -> None:
    cfg = {**cfg, "run_dir": str(tmp_path / "run")}
    rc, err = run_cli(tmp_path, cfg, capsys)
    assert rc == 2, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, f"expected one line, got: {err}"
    assert not (tmp_path / "run").exists(), "something was written"
    import ray

    assert not ray.is_initialized(), "Ray was started before the input was checked"


def copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_corpus_file(world, tmp_path, capsys):
    _, cfg = world
    expect_exit_2(tmp_path, {**cfg, "corpus": {**cfg["corpus"], "path": str(tmp_path / "nope.parquet")}},
                  capsys, "does not exist")


def test_missing_model_dir(world, tmp_path, capsys):
    _, cfg = world
    expect_exit_2(tmp_path, {**cfg, "finetuned_model": str(tmp_path / "no-model")}, capsys, "not a model directory")


def test_wrong_type(world, tmp_path, capsys):
    _, cfg = world
    expect_exit_2(tmp_path, {**cfg, "corpus": {**cfg["corpus"], "max_length": "long"}}, capsys, "corpus.max_length")


def test_top_k_not_positive(world, tmp_path, capsys):
    _, cfg = world
    expect_exit_2(tmp_path, {**cfg, "scoring": {**cfg["scoring"], "top_k": 0}}, capsys, "scoring.top_k")


def test_different_architectures(world, tmp_path, capsys):
    _, cfg = world
    tok = word_tokenizer(["x"])
    other = tiny_model("llama", 40, hidden=16, heads=2)
    other.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    expect_exit_2(tmp_path, {**cfg, "finetuned_model": str(tmp_path / "llama")}, capsys, "'model_type'")


def test_different_shapes(world, tmp_path, capsys):
    root, cfg = world
    from ray_influence.models import load_tokenizer

    tok = load_tokenizer(cfg["pretrained_model"])
    wide = tiny_model("gpt_neox", len(tok), hidden=32, heads=2)
    wide.save_pretrained(tmp_path / "wide")
    tok.save_pretrained(tmp_path / "wide")
    expect_exit_2(tmp_path, {**cfg, "finetuned_model": str(tmp_path / "wide")}, capsys, "'hidden_size'")


def test_tokenizer_mismatch(world, tmp_path, capsys):
    _, cfg = world
    ft = copy_model(cfg["finetuned_model"], tmp_path / "ft")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ft / f).unlink(missing_ok=True)
    word_tokenizer(["entirely different words here"]).save_pretrained(ft)
    expect_exit_2(tmp_path, {**cfg, "finetuned_model": str(ft)}, capsys, "tokenizers differ")


def test_no_query_left_to_attribute(world, tmp_path, capsys):
    """Bad queries are skipped one by one (tests/test_query_skip.py); none left is exit 2."""
    _, cfg = world
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"query_id": "q0", "prompt": "the cat", "completion": "  "}) + "\n"
                 + json.dumps({"query_id": "q0", "prompt": "the cat", "completion": " runs"}) + "\n")
    expect_exit_2(tmp_path, {**cfg, "queries": {"path": str(q)}}, capsys,
                  "every one of the 2 queries is skipped (duplicate_id: 1 (e.g. 'q0'), empty_completion: 1 (e.g. 'q0'))")


def test_empty_queries_file(world, tmp_path, capsys):
    _, cfg = world
    q = tmp_path / "q.jsonl"
    q.write_text("")
    expect_exit_2(tmp_path, {**cfg, "queries": {"path": str(q)}}, capsys, "hold no rows")


def test_missing_text_column(world, tmp_path, capsys):
    _, cfg = world
    expect_exit_2(tmp_path, {**cfg, "corpus": {**cfg["corpus"], "text_column": "body"}}, capsys, "'body'")


def test_remote_code_refused_unless_opted_in(world, tmp_path, capsys):
    _, cfg = world
    pt = copy_model(cfg["pretrained_model"], tmp_path / "pt")
    conf = json.loads((pt / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (pt / "config.json").write_text(json.dumps(conf))
    expect_exit_2(tmp_path, {**cfg, "pretrained_model": str(pt)}, capsys, "trust_remote_code")


def test_pickle_weights_refused_unless_opted_in(world, tmp_path, capsys):
    _, cfg = world
    from ray_influence.models import load_model

    import torch

    pt = tmp_path / "pt"
    model = load_model(cfg["pretrained_model"])
    model.config.save_pretrained(pt)
    torch.save(model.state_dict(), pt / "pytorch_model.bin")  # a pickle checkpoint
    shutil.copy(Path(cfg["pretrained_model"]) / "tokenizer.json", pt)
    shutil.copy(Path(cfg["pretrained_model"]) / "tokenizer_config.json", pt)
    assert not list(pt.glob("*.safetensors")) and list(pt.glob("*.bin"))
    expect_exit_2(tmp_path, {**cfg, "pretrained_model": str(pt)}, capsys, "allow_pickle")


def test_run_dir_with_a_different_config(world, tmp_path, capsys):
    _, cfg = world
    run = RunDir(str(tmp_path / "run"))
    old = {**cfg, "run_dir": str(tmp_path / "run"), "projection": {"dim": 8, "seed": 0, "dtype": "float32"}}
    from ray_influence.config import config_from_dict

    run.write_json("run.json", {"config": config_from_dict(old).to_dict(), "version": "0"})
    before = (tmp_path / "run" / "run.json").read_bytes()
    rc, err = run_cli(tmp_path, {**cfg, "run_dir": str(tmp_path / "run")}, capsys)
    assert rc == 2 and "'projection'" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "run" / "run.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json"]


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/etc", "x\\y", "", ".hidden", "a..b"])
def test_file_names_cannot_escape(name, tmp_path):
    with pytest.raises(ValueError, match="unsafe"):
        safe_name(name)
    if "/" not in name.strip("/") or ".." in name:  # 'a/b' is two safe parts of a relative path
        with pytest.raises(ValueError, match="unsafe"):
            RunDir(str(tmp_path)).path(f"index/{name}")


def test_odd_corpus_file_names_stay_inside_run_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_influence.data import list_files, plan_partitions

    odd = tmp_path / "c" / "we ird;$(rm -rf)..name.parquet"
    odd.parent.mkdir()
    pq.write_table(pa.table({"doc_id": [1], "text": ["x"]}), odd)
    (key,) = [p.key for p in plan_partitions(list_files(str(tmp_path / "c")), 10)]
    assert safe_name(key) == key and "/" not in key and ".." not in key
