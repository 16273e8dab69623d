"""Inputs over fsspec: files, directories or globs of Parquet, JSONL or Arrow.

A directory written by Hugging Face ``datasets``' ``save_to_disk`` (a ``state.json`` beside
its Arrow shards, and for a ``DatasetDict`` one such folder per split under a
``dataset_dict.json``) reads as the Arrow shards its ``state.json`` lists; its JSON
metadata files are not data.

The corpus is split into partitions per file: a file's rows ``[i * P, (i + 1) * P)`` form
its partition ``i`` (``P = partition_docs``). A partition's key derives from the file's
path relative to the corpus root and its number, so adding files leaves the keys of the
old partitions, and their index pieces, untouched.

Rows with a missing, non-string, empty or whitespace-only text are skipped with a reason;
a JSONL line that is not valid UTF-8 or not valid JSON is skipped the same way.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

HF_STATE, HF_INFO, HF_DICT = "state.json", "dataset_info.json", "dataset_dict.json"
"""The metadata files of a ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` directory."""

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
           ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}


class InputError(ValueError):
    """An input file or column the user named is missing or unreadable (exit code 2)."""


@dataclass(frozen=True)
class InputFile:
    """One data file: its URL, its path relative to the input root, its format, and a
    fingerprint of its properties (fsspec ``ukey``: size/mtime or ETag) that changes when
    the file is rewritten."""

    url: str
    rel: str
    format: str
    fingerprint: str = ""


def _format_of(path: str) -> str | None:
    for ext, fmt in FORMATS.items():
        if path.lower().endswith(ext):
            return fmt
    return None


def list_files(url: str, storage_options: dict | None = None) -> list[InputFile]:
    """Expands a file, a directory (recursively) or a glob into data files, sorted.

    Raises:
        InputError: if nothing matches, or a named file has an unknown format.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def to_url(p: str) -> str:
        return p if protocol in ("file", "local") else f"{protocol}://{p}"

    if any(c in path for c in "*?["):
        matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
        first_wildcard = min(path.index(c) for c in "*?[" if c in path)
        root = path[:first_wildcard].rsplit("/", 1)[0] or "/"
    elif fs.isdir(path):
        matches, root = _directory_files(fs, path, url), path
    elif fs.exists(path):
        if _format_of(path) is None:
            raise InputError(f"{url!r}: unknown format; expected one of {sorted(set(FORMATS))}")
        matches, root = [path], posixpath.dirname(path)
    else:
        raise InputError(f"input {url!r} does not exist")
    files = [InputFile(to_url(p), posixpath.relpath(p, root), _format_of(p), str(fs.ukey(p)))
             for p in matches if _format_of(p)]
    if not files:
        raise InputError(f"input {url!r} holds no Parquet, JSONL or Arrow file")
    return files


def _directory_files(fs, path: str, url: str) -> list[str]:
    """Data files under a directory, recursively, sorted; a ``save_to_disk`` folder gives its shards."""
    found = sorted(fs.find(path))
    hf_dirs = sorted({posixpath.dirname(p) for p in found if posixpath.basename(p) == HF_STATE})
    out = []
    for d in hf_dirs:
        try:
            with fs.open(posixpath.join(d, HF_STATE), "rb") as fh:
                shards = [f["filename"] for f in json.load(fh)["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{url!r}: {d}/{HF_STATE} is not a datasets state file ({e})") from None
        for name in shards:
            shard = posixpath.join(d, name)
            if _format_of(shard) != "arrow" or not fs.exists(shard):
                raise InputError(f"{url!r}: {d}/{HF_STATE} lists {name!r}, which is not an Arrow file here")
            out.append(shard)
    hf = set(hf_dirs)
    out += [p for p in found if _format_of(p) and posixpath.dirname(p) not in hf and posixpath.basename(p) != HF_DICT]
    return sorted(out)


def _arrow_schema(fh) -> pa.Schema:
    """The schema of an Arrow IPC file or stream (``save_to_disk`` writes streams), without its data."""
    try:
        return pa.ipc.open_file(fh).schema
    except pa.ArrowInvalid:
        fh.seek(0)
        return pa.ipc.open_stream(fh).schema


def _read_jsonl(fh, columns: list[str]) -> tuple[list[dict], list[tuple[int, str]], set[str]]:
    """Rows of a JSONL file; undecodable lines become ``(row number, reason)`` entries."""
    rows, bad, seen = [], [], set()
    for raw in fh:
        if not raw.strip():
            continue
        number = len(rows) + len(bad)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append((number, "invalid_utf8"))
            continue
        except json.JSONDecodeError:
            bad.append((number, "invalid_json"))
            continue
        if not isinstance(obj, dict):
            bad.append((number, "invalid_json"))
            continue
        seen.update(obj)
        rows.append({c: obj.get(c) for c in columns})
    return rows, bad, seen


def read_rows(f: InputFile, columns: list[str], storage_options: dict | None = None) -> tuple[list[dict], list[tuple[int, str]]]:
    """All rows of a file as dicts of ``columns`` (missing values as None).

    Returns:
        ``(rows, unreadable)`` where ``unreadable`` lists ``(row number, reason)`` of JSONL
        lines that could not be decoded; row numbers count every non-blank line.

    Raises:
        InputError: if a column is absent from a Parquet/Arrow file's schema.
    """
    with fsspec.open(f.url, "rb", **(storage_options or {})) as fh:
        if f.format == "jsonl":
            rows, bad, seen = _read_jsonl(fh, columns)
            missing = [c for c in columns if c not in seen]
            if rows and missing:
                raise InputError(f"{f.url}: column {missing[0]!r} not found; keys are {sorted(seen)}")
            return _merge_bad(rows, bad), bad
        if f.format == "parquet":
            table = pq.read_table(fh)
        else:
            data = fh.read()
            try:
                table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"{f.url}: column {missing[0]!r} not found; columns are {table.column_names}")
    return table.select(columns).to_pylist(), []


def _merge_bad(rows: list[dict], bad: list[tuple[int, str]]) -> list[dict]:
    """Puts placeholder rows (all None, with ``__unreadable__``) where JSONL lines failed."""
    if not bad:
        return rows
    out, it = [], iter(rows)
    bad_at = dict(bad)
    for i in range(len(rows) + len(bad)):
        out.append({"__unreadable__": bad_at[i]} if i in bad_at else next(it))
    return out


def check_columns(f: InputFile, columns: list[str], storage_options: dict | None = None) -> None:
    """Raises :class:`InputError` when a file lacks one of ``columns`` (schema / first lines only)."""
    with fsspec.open(f.url, "rb", **(storage_options or {})) as fh:
        if f.format == "parquet":
            names = pq.ParquetFile(fh).schema_arrow.names
        elif f.format == "arrow":
            names = _arrow_schema(fh).names
        else:
            names = set()
            for _, raw in zip(range(100), fh):
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if isinstance(obj, dict):
                    names |= set(obj)
            if not names:
                return  # nothing decodable up front: rows are skipped one by one later
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{f.url}: column {missing[0]!r} not found; columns are {sorted(names)}")


def count_rows(f: InputFile, storage_options: dict | None = None) -> int:
    """Rows in a file (Parquet from its footer; others by reading it)."""
    if f.format == "parquet":
        with fsspec.open(f.url, "rb", **(storage_options or {})) as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    with fsspec.open(f.url, "rb", **(storage_options or {})) as fh:
        if f.format == "jsonl":
            return sum(1 for line in fh if line.strip())
        data = fh.read()
    try:
        return pa.ipc.open_file(pa.BufferReader(data)).read_all().num_rows
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all().num_rows


# ------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Partition:
    """Rows ``[start, stop)`` of one corpus file.

    Attributes:
        key: file-name-safe, stable id of the partition.
        file: the data file.
        start, stop: row range in the file.
        offset: global position of the first row in the whole corpus, in this run's file
            order (ties in the top-k go to the lower position). Positions shift when a file
            that sorts earlier is added, so stored pieces keep rows within their file
            (:meth:`position` maps them back).
    """

    key: str
    file: InputFile
    start: int
    stop: int
    offset: int

    def __len__(self) -> int:
        return self.stop - self.start

    def position(self, row: int) -> int:
        """Global position, in this run's file order, of row ``row`` of the file."""
        return self.offset - self.start + row


def _key(rel: str, number: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", posixpath.basename(rel).rsplit(".", 1)[0])[:40] or "file"
    digest = hashlib.blake2b(rel.encode(), digest_size=4).hexdigest()
    return f"{stem}-{digest}-{number:05d}"


def plan_partitions(files: Iterable[InputFile], partition_docs: int, storage_options: dict | None = None) -> list[Partition]:
    """Splits every file into partitions of ``partition_docs`` rows, in file order."""
    parts, offset = [], 0
    for f in files:
        n = count_rows(f, storage_options)
        for i, start in enumerate(range(0, n, partition_docs)):
            stop = min(start + partition_docs, n)
            parts.append(Partition(_key(f.rel, i), f, start, stop, offset + start))
        offset += n
    return parts


@dataclass(frozen=True)
class Document:
    """A usable corpus row: its id, text, row within its file and global position."""

    doc_id: Any
    text: str
    row: int
    position: int


def clean_rows(rows: list[dict], id_column: str, text_column: str, part: Partition,
               drop: dict[int, str] | None = None) -> tuple[list[Document], list[tuple[Any, str]]]:
    """Splits a partition's rows into usable documents and ``(doc_id, reason)`` of skipped ones.

    Args:
        rows: the partition's rows, in file order.
        part: the partition they are.
        drop: rows (within the file) to skip with the given reason (e.g. duplicate ids).
    """
    docs, skipped = [], []
    drop = drop or {}
    for i, row in enumerate(rows):
        file_row = part.start + i
        where = f"<{part.file.rel} row {file_row}>"
        if "__unreadable__" in row:
            skipped.append((where, row["__unreadable__"]))
            continue
        doc_id, text = row.get(id_column), row.get(text_column)
        if doc_id is None:
            skipped.append((where, "missing_id"))
        elif file_row in drop:
            skipped.append((doc_id, drop[file_row]))
        elif text is None:
            skipped.append((doc_id, "missing_text"))
        elif not isinstance(text, str):
            skipped.append((doc_id, "not_text"))
        elif not text.strip():
            skipped.append((doc_id, "empty_text"))
        else:
            docs.append(Document(doc_id, text, file_row, part.position(file_row)))
    return docs, skipped


def _file_rows(f: InputFile, columns: list[str], storage_options: dict | None, cache: dict | None) -> list[dict]:
    key = (f.url, f.fingerprint, tuple(columns))
    if cache is not None and cache.get("key") == key:
        return cache["rows"]
    rows, _ = read_rows(f, columns, storage_options)
    if cache is not None:  # one file at a time
        cache.update(key=key, rows=rows)
    return rows


def read_partition(part: Partition, id_column: str, text_column: str, storage_options: dict | None = None,
                   cache: dict | None = None, drop: dict[int, str] | None = None
                   ) -> tuple[list[Document], list[tuple[Any, str]]]:
    """The documents of one partition and the rows it skips.

    Args:
        cache: optional dict a worker keeps so that it reads each file once.
        drop: rows (within the file) to skip, with their reason.
    """
    rows = _file_rows(part.file, [id_column, text_column], storage_options, cache)
    return clean_rows(rows[part.start : part.stop], id_column, text_column, part, drop)


def duplicate_rows(parts: Iterable[Partition], id_column: str, storage_options: dict | None = None
                   ) -> dict[str, dict[int, str]]:
    """The duplicate-id policy: the first occurrence in corpus order is kept, later ones skipped.

    Returns:
        ``{partition key: {row within file: "duplicate_id"}}`` for the partitions that have any.
    """
    seen: set = set()
    out: dict[str, dict[int, str]] = {}
    cache: dict = {}
    for part in parts:
        rows = _file_rows(part.file, [id_column], storage_options, cache)
        for i, row in enumerate(rows[part.start : part.stop]):
            doc_id = None if "__unreadable__" in row else row.get(id_column)
            if doc_id is None:
                continue
            key = (type(doc_id).__name__, repr(doc_id))
            if key in seen:
                out.setdefault(part.key, {})[part.start + i] = "duplicate_id"
            else:
                seen.add(key)
    return out

def read_records(url: str, columns: list[str], storage_options: dict | None = None) -> list[dict]:
    """Every row of every file under ``url`` (fine-tuning data and queries)."""
    out = []
    for f in list_files(url, storage_options):
        rows, bad = read_rows(f, columns, storage_options)
        if bad:
            raise InputError(f"{f.url}: row {bad[0][0]} is unreadable ({bad[0][1]})")
        out.extend(rows)
    return out
