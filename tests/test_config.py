"""Config validation: unknown keys, wrong types and bad values name the key."""

from __future__ import annotations

import copy

import pytest

from ray_influence.config import ConfigError, config_from_dict, describe, load_config

BASE = {
    "run_dir": "runs/x", "pretrained_model": "m/pt", "finetuned_model": "m/ft",
    "corpus": {"path": "c.parquet"}, "finetune_data": {"path": "f.jsonl"}, "queries": {"path": "q.jsonl"},
}


def cfg_with(path: str, value):
    d = copy.deepcopy(BASE)
    *head, last = path.split(".")
    node = d
    for h in head:
        node = node.setdefault(h, {})
    node[last] = value
    return d


def test_defaults_follow_the_design():
    cfg = config_from_dict(BASE)
    assert cfg.corpus.text_column == "text" and cfg.corpus.id_column == "doc_id"
    assert cfg.corpus.max_length == 512 and cfg.corpus.partition_docs == 10000
    assert cfg.modules.exclude == ["lm_head", "*embed*"]
    # fisher and damping: chosen by jobs/bench_defaults.py (docs/BENCHMARKS.md)
    assert cfg.ekfac.fisher == "empirical" and cfg.ekfac.damping == "auto*0.1" and cfg.ekfac.fisher_samples == 4
    assert cfg.projection.dim == 32 and cfg.scoring.methods == ["multi_stage"] and cfg.scoring.top_k == 100
    assert cfg.cluster.replicas == 2 and cfg.cluster.shards == 1


@pytest.mark.parametrize("path,value,needle", [
    ("ekfac.fisher_smaples", 2, "ekfac.fisher_smaples"),
    ("corpuss", {}, "corpuss"),
    ("corpus.max_length", "long", "corpus.max_length"),
    ("corpus.partition_docs", 2.5, "corpus.partition_docs"),
    ("cluster.replicas", True, "cluster.replicas"),
    ("modules.include", "*", "modules.include"),
    ("scoring.top_k", 0, "scoring.top_k"),
    ("scoring.top_k", -3, "scoring.top_k"),
    ("scoring.methods", ["tracin"], "tracin"),
    ("ekfac.fisher", "approximate", "approximate"),
    ("ekfac.fisher", False, "ekfac.fisher"),
    ("ekfac.damping", "lots", "lots"),
    ("ekfac.damping", -1.0, "-1.0"),
    ("ekfac.damping", {"pretrain": 0.1}, "ekfac.damping.pretrain"),
    ("ekfac.damping", "auto*0", "'auto*0'"),
    ("ekfac.damping", "auto*-1", "'auto*-1'"),
    ("ekfac.damping", "auto*lots", "'auto*lots'"),
    ("ekfac.damping", "10*auto", "'10*auto'"),
    ("ekfac.damping", {"finetuned": "auto*inf"}, "'auto*inf'"),
    ("projection.dim", -1, "projection.dim"),
    ("model.dtype", "float8", "float8"),
])
def test_bad_values_name_the_key(path, value, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("*", r"\*")):
        config_from_dict(cfg_with(path, value))


def test_missing_required_key():
    d = copy.deepcopy(BASE)
    del d["queries"]
    with pytest.raises(ConfigError, match="'queries'"):
        config_from_dict(d)


def test_damping_per_stage():
    cfg = config_from_dict(cfg_with("ekfac.damping", {"pretrained": 0.5}))
    assert cfg.ekfac.damping_for("pretrained") == 0.5 and cfg.ekfac.damping_for("finetuned") == "auto*0.1"
    assert config_from_dict(cfg_with("ekfac.damping", 1e-3)).ekfac.damping_for("finetuned") == 1e-3
    cfg = config_from_dict(cfg_with("ekfac.damping", {"pretrained": "auto*10", "finetuned": "auto * 0.5"}))
    assert cfg.ekfac.damping_for("pretrained") == "auto*10" and cfg.ekfac.damping_for("finetuned") == "auto * 0.5"


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(str(bad))


def test_describe_lists_every_key_with_help():
    text = describe()
    for key in ("run_dir:", "partition_docs: 10000", "fisher_samples: 4", "top_k: 100", "num_gpus_per_worker: 0"):
        assert key in text
    assert all("#" in line for line in text.splitlines())
