"""Property-based tests (hypothesis) over config parsing and corpus rows."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_influence.config import Config, ConfigError, config_from_dict
from ray_influence.data import InputFile, Partition, clean_rows

BASE = {"run_dir": "r", "pretrained_model": "p", "finetuned_model": "f", "corpus": {"path": "c"},
        "finetune_data": {"path": "d"}, "queries": {"path": "q"}}
SECTIONS = ["corpus", "ekfac", "projection", "scoring", "cluster", "modules", "model"]
KNOWN = {s: {f.name for f in __import__("dataclasses").fields(
    __import__("typing").get_type_hints(Config)[s])} for s in SECTIONS}

keys = st.text(st.characters(categories=["Ll", "Nd"], include_characters="_"), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(section=st.sampled_from(SECTIONS), key=keys, value=st.one_of(st.integers(), st.text(), st.booleans()))
def test_unknown_keys_are_always_named(section, key, value):
    if key in KNOWN[section]:
        return
    d = copy.deepcopy(BASE)
    d.setdefault(section, {})[key] = value
    try:
        config_from_dict(d)
    except ConfigError as e:
        assert f"{section}.{key}" in str(e)
    else:
        raise AssertionError(f"unknown key {section}.{key} accepted")


@settings(max_examples=200, deadline=None)
@given(top_k=st.integers(-5, 1000), dim=st.integers(-2, 256), replicas=st.integers(-1, 64),
       samples=st.integers(-1, 32))
def test_integer_fields_accept_exactly_their_ranges(top_k, dim, replicas, samples):
    d = copy.deepcopy(BASE)
    d.update(scoring={"top_k": top_k}, projection={"dim": dim}, cluster={"replicas": replicas},
             ekfac={"fisher_samples": samples})
    valid = top_k > 0 and dim >= 0 and replicas > 0 and samples > 0
    try:
        cfg = config_from_dict(d)
    except ConfigError as e:
        assert not valid, e
        assert any(k in str(e) for k in ("top_k", "projection.dim", "replicas", "fisher_samples"))
    else:
        assert valid and cfg.scoring.top_k == top_k and cfg.projection.dim == dim


texts = st.one_of(st.none(), st.text(max_size=20), st.integers(), st.floats(allow_nan=True),
                  st.lists(st.integers(), max_size=2), st.sampled_from(["", " ", "\t\n", "ok text"]))
ids = st.one_of(st.none(), st.integers(0, 10**6), st.text(min_size=1, max_size=6))


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries({"doc_id": ids, "text": texts}), max_size=30))
def test_every_row_is_either_a_document_or_skipped_with_a_reason(rows):
    part = Partition("p-00000", InputFile("file:///x.jsonl", "x.jsonl", "jsonl"), 0, len(rows), 0)
    docs, skipped = clean_rows(rows, "doc_id", "text", part)
    assert len(docs) + len(skipped) == len(rows)
    for d in docs:
        assert isinstance(d.text, str) and d.text.strip() and d.doc_id is not None
        assert rows[d.row]["text"] == d.text
    reasons = {"missing_text", "empty_text", "not_text", "missing_id"}
    assert all(r in reasons for _, r in skipped)
    assert [d.position for d in docs] == sorted(d.position for d in docs)
