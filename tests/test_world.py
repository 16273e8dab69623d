"""The synthetic two-stage world: deterministic, and its ground truth is consistent."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from ray_influence import world as W
from ray_influence.config import EkfacConfig, ScoringConfig, config_from_dict
from ray_influence.toy import bpe_tokenizer, word_tokenizer
from ray_influence.world import WorldSpec, attribution_metrics, generate, random_baseline, words

SPEC = WorldSpec()  # the demo world's sizes: generation alone takes milliseconds
SMALL = WorldSpec(n_entities=12, relations=("born_in", "pet"), n_distractors=30, seed=3)


@pytest.fixture(scope="module", params=[SPEC, SMALL], ids=["demo", "small"])
def data(request):
    return request.param, generate(request.param)


def as_plain(d: W.WorldData) -> tuple:
    return d.corpus, d.finetune, d.queries, d.truth


def test_same_seed_same_world():
    assert as_plain(generate(SPEC)) == as_plain(generate(WorldSpec()))
    assert as_plain(generate(SMALL)) == as_plain(generate(dataclasses.replace(SMALL)))


def test_different_seed_different_world():
    a, b = generate(SPEC), generate(dataclasses.replace(SPEC, seed=1))
    assert [d["text"] for d in a.corpus] != [d["text"] for d in b.corpus]
    assert a.truth != b.truth
    assert {f.entity for f in a.facts} != {f.entity for f in b.facts}


def test_training_fields_do_not_change_the_texts():
    other = dataclasses.replace(SPEC, pretrain_steps=7, hidden=8)
    assert as_plain(generate(other)) == as_plain(generate(SPEC))
    assert other.key != SPEC.key


def test_sizes(data):
    spec, d = data
    assert len(d.facts) == spec.n_entities * len(spec.relations)
    assert len({f.entity for f in d.facts}) == spec.n_entities
    ids = [r["doc_id"] for r in d.corpus]
    assert len(set(ids)) == len(ids)
    lo, hi = spec.docs_per_fact
    assert all(lo <= len(f.doc_ids) <= hi for f in d.facts)
    fact_docs = {i for f in d.facts for i in f.doc_ids}
    assert fact_docs <= set(ids)
    assert sum(len(f.doc_ids) for f in d.facts) == len(fact_docs)  # a document states one fact
    assert len(ids) - len(fact_docs) == spec.n_distractors
    assert len(d.finetune) + len(d.queries) == len(d.facts)
    n_held = len(d.queries)
    assert abs(n_held / len(d.facts) - spec.heldout_fraction) < 0.05
    # Every relation is both fine-tuned on and queried.
    for rel in spec.relations:
        splits = {f.split for f in d.facts if f.relation == rel}
        assert splits == {"finetune", "heldout"}


def test_truth_documents_state_their_fact(data):
    _, d = data
    text = {r["doc_id"]: r["text"] for r in d.corpus}
    for f in d.facts:
        for doc_id in f.doc_ids:
            ws = words(text[doc_id])
            assert f.entity in ws and f.value in ws, (f, text[doc_id])


def test_no_other_document_states_a_facts_value(data):
    """A distractor, or a document of another fact, never names an entity with one of its values."""
    _, d = data
    doc_words = {r["doc_id"]: words(r["text"]) for r in d.corpus}
    for f in d.facts:
        own = set(f.doc_ids)
        offenders = [i for i, ws in doc_words.items() if i not in own and f.entity in ws and f.value in ws]
        assert not offenders, (f, [r["text"] for r in d.corpus if r["doc_id"] in offenders])


def test_distractors_mention_entities(data):
    _, d = data
    entities = {f.entity for f in d.facts}
    fact_docs = {i for f in d.facts for i in f.doc_ids}
    distractors = [r["text"] for r in d.corpus if r["doc_id"] not in fact_docs]
    assert all(words(t) & entities for t in distractors)
    # Some distractors name a value word of a relation (just not the entity's own).
    values = {v for r in W.RELATIONS.values() for v in r.values}
    assert any(words(t) & values for t in distractors)


def test_heldout_facts_are_not_in_the_finetuning_set(data):
    _, d = data
    held = [f for f in d.facts if f.split == "heldout"]
    prompts = {r["prompt"] for r in d.finetune}
    for f in held:
        assert f.question not in prompts
        assert not any(f.entity in words(r["prompt"]) and r["completion"] == f" {f.value}"
                       and W.RELATIONS[f.relation].question.format(e=f.entity) == r["prompt"] for r in d.finetune)
    # Queries are exactly the held-out facts, the fine-tuning set exactly the others.
    assert sorted(q["query_id"] for q in d.queries) == sorted(f.query_id for f in held)
    assert sorted(r["prompt"] for r in d.finetune) == sorted(f.question for f in d.facts if f.split == "finetune")
    for q in d.queries:
        t = d.truth["queries"][q["query_id"]]
        fact = d.truth["facts"][t["fact_id"]]
        assert fact["split"] == "heldout" and q["completion"] == f" {fact['value']}"
        assert t["doc_ids"] == fact["doc_ids"]


def test_memorisation_probes_end_before_the_value(data):
    _, d = data
    probes = W.memorisation_probes(d)
    assert len(probes) == sum(len(f.doc_ids) for f in d.facts)
    for f, prefix in probes:
        assert f.entity in words(prefix) and f.value not in words(prefix)


def test_vocabulary_is_small_and_values_are_single_tokens():
    d = generate(SPEC)
    tok = word_tokenizer(d.texts)
    assert len(tok) < 250
    for f in d.facts:
        assert len(tok(f" {f.value}", add_special_tokens=False)["input_ids"]) == 1
        assert len(tok(f.entity, add_special_tokens=False)["input_ids"]) == 1


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown relations"):
        WorldSpec(relations=("born_in", "height"))
    with pytest.raises(ValueError, match="docs_per_fact"):
        WorldSpec(docs_per_fact=(0, 2))
    with pytest.raises(ValueError, match="heldout_fraction"):
        WorldSpec(heldout_fraction=1.0)
    assert WorldSpec.from_dict(SPEC.to_dict()) == SPEC


# ---------------------------------------------------------------------------- metrics

TRUTH = {"queries": {"a": {"doc_ids": ["d1", "d2"]}, "b": {"doc_ids": ["d3"]}}}


def test_metrics_by_hand():
    rows = [  # a: truth at ranks 2 and 12; b: truth at rank 1
        *({"method": "m", "query_id": "a", "rank": r, "doc_id": d}
          for r, d in enumerate(["x", "d1", *[f"y{i}" for i in range(9)], "d2"], 1)),
        {"method": "m", "query_id": "b", "rank": 1, "doc_id": "d3"},
        {"method": "n", "query_id": "a", "rank": 1, "doc_id": "x"},  # b missing: RR 0, recall 0
    ]
    m = attribution_metrics(rows, TRUTH, k=10)
    assert m["m"]["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["m"]["recall@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["n"] == {"mrr": 0.0, "recall@10": 0.0, "queries": 2}


def test_random_baseline_matches_closed_form_and_simulation():
    n = 50
    base = random_baseline(TRUTH, n, k=10)
    assert base["recall@10"] == pytest.approx(10 / n)
    harmonic = sum(1 / r for r in range(1, n + 1))
    rr_two = sum((n - r) / r for r in range(1, n)) / math.comb(n, 2)  # m=2: P(first at r) = (N-r)/C(N,2)
    assert base["mrr"] == pytest.approx((harmonic / n + rr_two) / 2)
    rng = random.Random(0)
    docs = ["d1", "d2", "d3", *[f"z{i}" for i in range(n - 3)]]
    rows = []
    for trial in range(2000):
        order = rng.sample(docs, n)
        rows += [{"method": "r", "query_id": f"{q}{trial}", "rank": i, "doc_id": d}
                 for q in "ab" for i, d in enumerate(order, 1)]
    truth = {f"{q}{t}": TRUTH["queries"][q] for q in "ab" for t in range(2000)}
    sim = attribution_metrics(rows, truth, k=10)["r"]
    assert sim["mrr"] == pytest.approx(base["mrr"], rel=0.08)
    assert sim["recall@10"] == pytest.approx(base["recall@10"], rel=0.08)


# ------------------------------------------------------------------------- on disk

TINY = WorldSpec(n_entities=6, relations=("born_in", "works_as"), n_distractors=6, hidden=8, heads=2,
                 pretrain_steps=3, finetune_steps=2, batch_size=8)


def test_build_world_writes_everything_and_is_cached(tmp_path, monkeypatch):
    import json

    import pyarrow.parquet as pq

    w = W.build_world(TINY, tmp_path, log=lambda msg: None)
    assert w.root == tmp_path.absolute() / f"world-{TINY.key}"
    for name in ("corpus.parquet", "finetune.jsonl", "queries.jsonl", "truth.json", "stats.json", "spec.json",
                 "models/pt/config.json", "models/pt/model.safetensors", "models/ft/model.safetensors",
                 "models/pt/tokenizer.json"):
        assert (w.root / name).exists(), name
    assert pq.read_table(w.corpus_path).to_pylist() == w.data.corpus
    assert json.loads((w.root / "truth.json").read_text()) == w.data.truth
    assert [json.loads(line) for line in w.queries_path.read_text().splitlines()] == w.data.queries
    for key in ("memorisation", "memorisation_heldout", "qa_heldout", "qa_finetune", "pretrain_seconds"):
        assert 0 <= w.stats[key] <= (1 if not key.endswith("seconds") else 1e6)
    assert not list(tmp_path.glob("*.tmp-*"))

    def no_training(*args, **kwargs):
        raise AssertionError("a cached world was retrained")

    monkeypatch.setattr(W, "_train_models", no_training)
    again = W.build_world(TINY, tmp_path, log=lambda msg: None)
    assert again.stats == w.stats and again.data == w.data
    with pytest.raises(AssertionError, match="retrained"):
        W.build_world(dataclasses.replace(TINY, pretrain_steps=4), tmp_path, log=lambda msg: None)


def test_job_config_is_valid(tmp_path):
    w = W.build_world(TINY, tmp_path, log=lambda msg: None)
    cfg = config_from_dict(W.job_config(w))
    assert cfg.run_dir == str(w.root / "run")
    assert [m.value for m in cfg.methods] == ["multi_stage", "single_stage", "grad_dot", "grad_cos"]
    assert cfg.corpus.partition_docs * 4 >= len(w.data.corpus)
    assert cfg.ekfac == EkfacConfig()  # the demo runs the EK-FAC defaults
    assert cfg.scoring.mode == ScoringConfig().mode and cfg.scoring.query_rank == ScoringConfig().query_rank
    cfg = config_from_dict(W.job_config(w, tmp_path / "r", projection={"dim": 16, "seed": 1}))
    assert cfg.projection.dim == 16 and cfg.run_dir == str(tmp_path / "r")


# ---------------------------------------------------------------------- the family


def test_bpe_tokenizer_is_deterministic_and_splits_rare_words():
    d = generate(SPEC)
    a, b = bpe_tokenizer(d.texts), bpe_tokenizer(d.texts)
    assert a.get_vocab() == b.get_vocab() and len(a) == 512
    assert [a.convert_ids_to_tokens(i) for i in range(3)] == ["<pad>", "<unk>", "<eos>"]
    pieces = [len(a(f" {f.entity}", add_special_tokens=False)["input_ids"]) for f in d.facts]
    assert max(pieces) >= 3  # made-up names come out in pieces
    assert len(a(" the", add_special_tokens=False)["input_ids"]) == 1  # frequent words in one
    for t in d.texts:  # byte-level: lossless, and the texts fit the world's max_length
        ids = a(t, add_special_tokens=False)["input_ids"]
        assert a.decode(ids) == t and len(ids) < SPEC.max_length


def test_later_fields_keep_old_keys():
    assert WorldSpec(tokenizer="word", bpe_vocab=512).key == WorldSpec().key
    assert WorldSpec(tokenizer="bpe").key != WorldSpec().key
    assert WorldSpec(tokenizer="bpe", bpe_vocab=600).key != WorldSpec(tokenizer="bpe").key
    with pytest.raises(ValueError, match="tokenizer"):
        WorldSpec(tokenizer="sentencepiece")


def test_world_family():
    names = [w.name for w in W.WORLD_FAMILY]
    assert len(set(names)) == len(names) and len({w.spec.key for w in W.WORLD_FAMILY}) == len(names)
    held = [w for w in W.WORLD_FAMILY if w.held_out]
    assert len(held) >= 2 and len(held) < len(names) - 3
    assert any(w.spec.hidden >= 128 and w.spec.layers >= 4 for w in W.WORLD_FAMILY if not w.held_out)
    assert {w.spec.tokenizer for w in W.WORLD_FAMILY if not w.held_out} == {"word", "bpe"}
    assert W.WORLD_FAMILY[0].spec == WorldSpec()  # the demo world
    for w in W.WORLD_FAMILY:
        d = generate(w.spec)
        assert len(d.queries) > 0 and len(d.corpus) > w.spec.n_distractors


def test_bpe_world_builds_and_completion_probs_teacher_force(tmp_path):
    import torch

    w = W.build_world(dataclasses.replace(TINY, tokenizer="bpe", bpe_vocab=300), tmp_path, log=lambda msg: None)
    assert 0 < w.stats["finetune_distance"] < 1
    from ray_influence.models import load_model, load_tokenizer

    model, tok = load_model(str(w.finetuned_model)), load_tokenizer(str(w.finetuned_model))
    prompt, completion = w.data.queries[0]["prompt"], " " + w.data.facts[0].entity
    hits, probs = W.completion_probs(model, tok, [prompt, prompt], [completion, completion])
    ids, target = tok(prompt)["input_ids"], tok(completion, add_special_tokens=False)["input_ids"]
    assert len(target) >= 2
    p, greedy = 1.0, True
    for t in target:  # one forward per token, on the growing prefix
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        p *= float(logits.softmax(-1)[t])
        greedy &= int(logits.argmax()) == t
        ids = ids + [t]
    assert hits == [greedy, greedy]
    # float32 model: each token's probability carries ~1e-6 relative error from its logits
    assert probs[0] == pytest.approx(p, rel=1e-5) and probs[1] == probs[0]
