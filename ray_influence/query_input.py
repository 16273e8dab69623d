"""Which queries a run attributes, and why the others are skipped (the corpus's policy).

One function, :func:`select_queries`, decides: the preflight calls it to refuse a run
with nothing to attribute before Ray starts, and the worker calls it to pick the queries
it takes gradients of. The kept queries keep their file order. A query is skipped, with
one of :data:`REASONS`, when

- its line is not valid UTF-8 or JSON (JSONL): ``invalid_utf8``, ``invalid_json``;
- it has no id: ``missing_id``; its id, as text, is an earlier row's: ``duplicate_id``
  (the first row with an id is the query, whatever becomes of it);
- its completion is null: ``missing_completion``; its completion, or a non-null prompt,
  is not a string: ``not_text``;
- its completion is empty or whitespace only (``str.strip``): ``empty_completion``, even
  when the tokenizer gives whitespace tokens of its own (a space token, a newline token):
  a blank answer is skipped, never attributed;
- its tokens hold no loss target (the completion tokenises to nothing, or
  ``queries.max_length`` leaves no room for it): ``no_loss_token``;
- its loss at the fine-tuned model is not finite (found by the query pass):
  ``non_finite_loss``.

The skipped queries are listed in ``{run_dir}/skipped_queries.parquet`` (``query_id``,
``reason``); a row without an id is named ``<file row N>``, as in ``skipped.parquet``.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .data import InputError, list_files, read_rows
from .tokens import Example, tokenize_prompt_completion

SKIPPED_QUERIES = "skipped_queries.parquet"
"""Every skipped query of the last query stage: ``query_id``, ``reason``."""

REASONS = ("invalid_utf8", "invalid_json", "missing_id", "duplicate_id", "missing_completion", "not_text",
           "empty_completion", "no_loss_token", "non_finite_loss")
"""Why a query is skipped, in the order the checks run."""


@dataclass(frozen=True)
class QueryRow:
    """One row of the queries input, as read.

    Attributes:
        where: ``<file row N>``: the row's file (relative to the input root) and row number.
        values: the id, prompt and completion columns (missing values as None), or
            ``{"__unreadable__": reason}`` for a JSONL line that could not be decoded.
    """

    where: str
    values: dict


@dataclass(frozen=True)
class QuerySelection:
    """The queries a run attributes, in file order, and the skipped ones.

    Attributes:
        records: the kept rows (id, prompt and completion columns).
        examples: their tokens, one per record.
        skipped: ``(query id as text, or <file row N>, reason)`` of the rest, in file order.
        id_column: the id column of ``records``.
    """

    records: tuple[dict, ...]
    examples: tuple[Example, ...]
    skipped: tuple[tuple[str, str], ...]
    id_column: str

    @property
    def ids(self) -> list[Any]:
        """The kept queries' ids, of the id column's type."""
        return [r[self.id_column] for r in self.records]

    def reason_counts(self) -> dict[str, int]:
        """``{reason: skipped queries}``, in :data:`REASONS` order."""
        counts = Counter(r for _, r in self.skipped)
        return {r: counts[r] for r in REASONS if counts[r]}

    def without(self, keys: Sequence[str], reason: str) -> "QuerySelection":
        """This selection with the queries whose example key is in ``keys`` skipped for ``reason``.

        Args:
            keys: example keys (the query ids as text) found bad after selection, e.g. by the
                query pass (``non_finite_loss``).
            reason: one of :data:`REASONS`.
        """
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {REASONS}")
        drop = set(keys)
        kept = [(r, e) for r, e in zip(self.records, self.examples) if e.key not in drop]
        gone = [(e.key, reason) for e in self.examples if e.key in drop]
        return QuerySelection(tuple(r for r, _ in kept), tuple(e for _, e in kept), self.skipped + tuple(gone),
                              self.id_column)


def read_query_rows(qcfg, storage_options: dict | None = None) -> list[QueryRow]:
    """Every row of the queries input, in file order, undecodable JSONL lines included.

    Args:
        qcfg: the config's ``queries`` section.

    Raises:
        InputError: the input does not exist, or a file lacks one of the columns.
    """
    columns = [qcfg.id_column, qcfg.prompt_column, qcfg.completion_column]
    out = []
    for f in list_files(qcfg.path, storage_options):
        rows, _ = read_rows(f, columns, storage_options)
        out += [QueryRow(f"<{f.rel} row {i}>", row) for i, row in enumerate(rows)]
    return out


def _text_reason(prompt: Any, completion: Any) -> str | None:
    """Why a row's prompt and completion cannot be attributed, before tokenisation; None if they can."""
    if completion is None:
        return "missing_completion"
    if not isinstance(completion, str) or (prompt is not None and not isinstance(prompt, str)):
        return "not_text"
    if not completion.strip():
        return "empty_completion"
    return None


def _example(tokenizer, key: str, prompt: str | None, completion: str, max_length: int) -> Example | None:
    """The query's tokens (the loss covers the completion), or None if no token is a loss target."""
    try:
        ex = tokenize_prompt_completion(tokenizer, key, prompt or "", completion, max_length, add_eos=False)
    except ValueError:  # the completion tokenises to nothing
        return None
    return ex if ex.n_targets else None


def select_queries(rows: Sequence[QueryRow], qcfg, tokenizer) -> QuerySelection:
    """The queries to attribute, in file order, and ``(id, reason)`` of those skipped.

    Args:
        rows: :func:`read_query_rows`.
        qcfg: the config's ``queries`` section (columns, ``max_length``).
        tokenizer: the fine-tuned model's tokenizer.
    """
    q = qcfg
    records, examples, skipped = [], [], []
    seen: set[str] = set()
    for row in rows:
        v = row.values
        if "__unreadable__" in v:
            skipped.append((row.where, v["__unreadable__"]))
            continue
        qid = v.get(q.id_column)
        if qid is None:
            skipped.append((row.where, "missing_id"))
            continue
        key = str(qid)  # the example key: ids equal as text are one query
        if key in seen:
            skipped.append((key, "duplicate_id"))
            continue
        seen.add(key)
        prompt, completion = v.get(q.prompt_column), v.get(q.completion_column)
        reason = _text_reason(prompt, completion)
        ex = None if reason else _example(tokenizer, key, prompt, completion, q.max_length)
        if reason is None and ex is None:
            reason = "no_loss_token"
        if reason:
            skipped.append((key, reason))
        else:
            records.append(v)
            examples.append(ex)
    return QuerySelection(tuple(records), tuple(examples), tuple(skipped), q.id_column)


def describe_skipped(selection: QuerySelection) -> str:
    """``reason: count (e.g. 'id')`` per reason, for one-line messages."""
    first: dict[str, str] = {}
    for qid, reason in selection.skipped:
        first.setdefault(reason, qid)
    return ", ".join(f"{r}: {n} (e.g. {first[r]!r})" for r, n in selection.reason_counts().items())


def require_queries(selection: QuerySelection, url: str, n_rows: int) -> None:
    """Raises :class:`InputError` (exit code 2) when nothing is left to attribute.

    Args:
        selection: :func:`select_queries` of the input.
        url: the queries input, for the message.
        n_rows: rows the input holds.
    """
    if n_rows == 0:
        raise InputError(f"queries {url!r} hold no rows; there is nothing to attribute")
    if not selection.records:
        raise InputError(f"queries {url!r}: nothing to attribute, every one of the {n_rows} queries is skipped "
                         f"({describe_skipped(selection)})")


def load_queries(qcfg, tokenizer, storage_options: dict | None = None) -> QuerySelection:
    """:func:`select_queries` of the configured input; :class:`InputError` when none is kept."""
    rows = read_query_rows(qcfg, storage_options)
    selection = select_queries(rows, qcfg, tokenizer)
    require_queries(selection, qcfg.path, len(rows))
    return selection


def finite_queries(selection: QuerySelection, non_finite: Sequence[str]) -> QuerySelection:
    """``selection`` without the queries whose loss the query pass found not finite.

    Args:
        non_finite: their example keys (the pass's skipped keys).

    Raises:
        ValueError: when no query is left (exit code 1: the models, not the input, are at fault).
    """
    left = selection.without(non_finite, "non_finite_loss")
    if not left.records:
        raise ValueError(f"every query is skipped ({describe_skipped(left)}): none of those left has a finite "
                         "loss at the fine-tuned model, so there is nothing to attribute")
    return left


def skipped_summary(selection: QuerySelection) -> dict:
    """The query stage's summary entries of the skipped queries: their count, and per reason."""
    return {"skipped": len(selection.skipped), "skipped_by_reason": selection.reason_counts()}


def skipped_table(skipped: Sequence[tuple[Any, str]]) -> pa.Table:
    """``query_id`` (text), ``reason``: the schema of :data:`SKIPPED_QUERIES`."""
    return pa.table({"query_id": pa.array([str(q) for q, _ in skipped], pa.string()),
                     "reason": pa.array([r for _, r in skipped], pa.string())})


def write_skipped_queries(run, skipped: Sequence[tuple[Any, str]]) -> int:
    """Writes :data:`SKIPPED_QUERIES` (replacing the last query stage's, even with none); returns the count."""
    from .store import _parquet_bytes

    run.write_bytes(SKIPPED_QUERIES, _parquet_bytes(skipped_table(skipped)))
    return len(skipped)


def read_skipped_reasons(run) -> Counter | None:
    """``Counter({reason: skipped queries})`` of a run directory; None when it holds no list yet."""
    if not run.exists(SKIPPED_QUERIES):
        return None
    # use_threads=False: pyarrow's thread pool and torch's can abort the interpreter at exit.
    table = pq.read_table(io.BytesIO(run.read_bytes(SKIPPED_QUERIES)), columns=["reason"], use_threads=False)
    return Counter(table.column("reason").to_pylist())
