"""Which queries are attributed and why the others are skipped (no Ray, no model)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_influence.config import QueriesConfig
from ray_influence.data import InputError
from ray_influence.preflight import check_queries
from ray_influence.query_input import (
    REASONS,
    describe_skipped,
    finite_queries,
    load_queries,
    read_query_rows,
    select_queries,
)
from ray_influence.toy import word_tokenizer

WORDS = "the red cat runs blue dog sits"


@pytest.fixture(scope="module")
def words():
    """Word-level: whitespace tokenises to nothing."""
    return word_tokenizer([WORDS])


@pytest.fixture(scope="module")
def bytes_bpe():
    """Byte-level BPE (as GPT-2, GPT-NeoX, Llama 3): a space or a newline is a token of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([WORDS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def write_jsonl(path, rows: list) -> str:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return str(path)


def q(qid, completion, prompt="the red cat") -> dict:
    return {"query_id": qid, "prompt": prompt, "completion": completion}


def test_every_reason_in_file_order_and_the_rest_kept(tmp_path, words):
    path = write_jsonl(tmp_path / "q.jsonl", [
        q("q0", " runs"),
        q("q1", ""),
        b'{"query_id": "q2", "prompt": "the", "completion": broken}\n',
        q(None, " sits"),
        q("q0", " sits"),  # a duplicate of the first row: the first is kept
        q("q3", None),
        q("q4", 7),
        q("q5", " runs", prompt=["the", "cat"]),
        q("q6", " \t\n "),
        q("q7", " red dog"),
        q(8, " blue"),  # an int id is kept with its type
        q("q9", " dog", prompt=None),  # no prompt: the completion follows EOS
        b'{"query_id": "q10", "prompt": "bad \xff", "completion": " cat"}\n',
    ])
    sel = select_queries(read_query_rows(QueriesConfig(path=path)), QueriesConfig(path=path), words)
    assert sel.ids == ["q0", "q7", 8, "q9"]
    assert [e.key for e in sel.examples] == ["q0", "q7", "8", "q9"]
    assert [r["completion"] for r in sel.records] == [" runs", " red dog", " blue", " dog"]
    assert list(sel.skipped) == [
        ("q1", "empty_completion"), ("<q.jsonl row 2>", "invalid_json"), ("<q.jsonl row 3>", "missing_id"),
        ("q0", "duplicate_id"), ("q3", "missing_completion"), ("q4", "not_text"), ("q5", "not_text"),
        ("q6", "empty_completion"), ("<q.jsonl row 12>", "invalid_utf8")]
    assert sel.reason_counts() == {"invalid_utf8": 1, "invalid_json": 1, "missing_id": 1, "duplicate_id": 1,
                                   "missing_completion": 1, "not_text": 2, "empty_completion": 2}
    assert set(sel.reason_counts()) <= set(REASONS)


def test_the_kept_examples_are_the_query_tokens(tmp_path, words):
    from ray_influence.tokens import tokenize_prompt_completion

    path = write_jsonl(tmp_path / "q.jsonl", [q("a", ""), q("b", " red cat")])
    sel = load_queries(QueriesConfig(path=path, max_length=6), words)
    assert sel.examples == (tokenize_prompt_completion(words, "b", "the red cat", " red cat", 6, add_eos=False),)


def test_whitespace_completions_are_skipped_even_when_they_tokenise(tmp_path, words, bytes_bpe):
    """The rule: a completion that is empty or whitespace only (``str.strip``) is never attributed.

    With a byte-level tokenizer a space is a real token, and its loss is well defined; it is
    skipped all the same, so the same queries are attributed whatever the tokenizer.
    """
    blanks = [" ", "\n", " \t ", "\u00a0", "\u3000"]
    path = write_jsonl(tmp_path / "q.jsonl", [q(f"w{i}", c) for i, c in enumerate(blanks)] + [q("ok", " red\n")])
    cfg = QueriesConfig(path=path)
    assert all(bytes_bpe(c, add_special_tokens=False)["input_ids"] for c in blanks[:3]), "the space tokens exist"
    for tok in (words, bytes_bpe):
        sel = load_queries(cfg, tok)
        assert sel.ids == ["ok"]
        assert list(sel.skipped) == [(f"w{i}", "empty_completion") for i in range(len(blanks))]
    # Whitespace around real words is part of the answer: its tokens stay in the loss.
    (ex,) = load_queries(cfg, bytes_bpe).examples
    assert ex.n_targets == len(bytes_bpe(" red\n", add_special_tokens=False)["input_ids"]) > 1


def test_a_completion_with_no_loss_token_is_skipped(tmp_path, words, monkeypatch):
    path = write_jsonl(tmp_path / "q.jsonl", [q("a", " red"), q("b", " cat")])
    # queries.max_length 1 leaves no room for a completion token after the prompt.
    sel = load_queries(QueriesConfig(path=path, max_length=2), words)
    assert sel.ids == ["a", "b"]
    with pytest.raises(InputError, match=r"no_loss_token: 2 \(e.g. 'a'\)"):
        load_queries(QueriesConfig(path=path, max_length=1), words)
    # A tokenizer that drops the text (nothing to predict) gives no loss token either.
    class DropsCat:
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [] if text == " cat" else [3]}

    sel = select_queries(read_query_rows(QueriesConfig(path=path)), QueriesConfig(path=path), DropsCat())
    assert sel.ids == ["a"] and list(sel.skipped) == [("b", "no_loss_token")]


def test_nothing_left_is_one_input_error_naming_reasons_and_counts(tmp_path, words):
    path = write_jsonl(tmp_path / "q.jsonl", [q("a", ""), q("b", "  "), q("a", " red"), q(None, " red")])
    with pytest.raises(InputError) as err:
        load_queries(QueriesConfig(path=path), words)
    msg = str(err.value)
    assert "\n" not in msg and "every one of the 4 queries is skipped" in msg, msg
    assert "missing_id: 1 (e.g. '<q.jsonl row 3>'), duplicate_id: 1 (e.g. 'a'), empty_completion: 2 (e.g. 'a')" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="hold no rows"):
        load_queries(QueriesConfig(path=str(empty)), words)


def test_parquet_nulls_and_several_files_keep_file_order(tmp_path, words):
    d = tmp_path / "queries"
    d.mkdir()
    pq.write_table(pa.table({"query_id": ["a", "b", None], "prompt": ["the", None, "the"],
                             "completion": [" red", None, " cat"]}), d / "0.parquet")
    write_jsonl(d / "1.jsonl", [q("b", " dog"), q("c", " sits")])
    sel = load_queries(QueriesConfig(path=str(d)), words)
    assert sel.ids == ["a", "c"]
    assert list(sel.skipped) == [("b", "missing_completion"), ("<0.parquet row 2>", "missing_id"),
                                 ("b", "duplicate_id")]


def test_non_finite_losses_are_skipped_after_the_pass(tmp_path, words):
    path = write_jsonl(tmp_path / "q.jsonl", [q("a", " red"), q("b", ""), q("c", " cat")])
    sel = finite_queries(load_queries(QueriesConfig(path=path), words), ["a"])
    assert sel.ids == ["c"] and [e.key for e in sel.examples] == ["c"]
    assert list(sel.skipped) == [("b", "empty_completion"), ("a", "non_finite_loss")]
    assert describe_skipped(sel) == "empty_completion: 1 (e.g. 'b'), non_finite_loss: 1 (e.g. 'a')"
    with pytest.raises(ValueError, match=r"every query is skipped \(empty_completion: 1 .*non_finite_loss: 2"):
        finite_queries(sel, ["c"])


def test_preflight_uses_the_same_decision(tmp_path, words):
    from ray_influence.config import config_from_dict

    good = write_jsonl(tmp_path / "good.jsonl", [q("a", " "), q("b", " red")])
    bad = write_jsonl(tmp_path / "bad.jsonl", [q("a", " "), q("a", " red")])
    base = {"run_dir": str(tmp_path / "run"), "pretrained_model": "pt", "finetuned_model": "ft",
            "corpus": {"path": good}, "finetune_data": {"path": good}}
    check_queries(config_from_dict({**base, "queries": {"path": good}}), words)  # one left: the run goes on
    with pytest.raises(InputError, match=r"duplicate_id: 1 \(e.g. 'a'\), empty_completion: 1 \(e.g. 'a'\)"):
        check_queries(config_from_dict({**base, "queries": {"path": bad}}), words)
