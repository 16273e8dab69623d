"""What each stage writes to the run directory, and how it is read back.

Tensors go to safetensors (with JSON metadata in the header), tables to Parquet; every
piece goes through :meth:`RunDir.write_piece`, so it is atomic and checksummed. See
:mod:`ray_influence.rundir` for the layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import threading
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

try:  # a dependency of the project (and of datasets); optional here, sha256 is the fallback
    import xxhash
except ImportError:  # pragma: no cover
    xxhash = None

from .data import Document, Partition
from .rundir import DamagedArtifact, RunDir
from .tokens import Example

STAGES = ("pretrained", "finetuned")


def factors_rel(stage: str, shard: int) -> str:
    return f"factors/{stage}.shard-{shard}.safetensors"


def index_rel(stage: str, shard: int, part_key: str) -> str:
    return f"index/{stage}/shard-{shard}/{part_key}.safetensors"


def docs_rel(part_key: str) -> str:
    return f"docs/{part_key}.parquet"


def skipped_rel(part_key: str) -> str:
    return f"skipped/{part_key}.parquet"


def fused_rel(token: str, part_key: str) -> str:
    """One partition's top-k of a fused pass, for the query set ``token`` names."""
    return f"fused/{token}/{part_key}.safetensors"


def write_fused_piece(run: RunDir, token: str, part: Partition, top: dict, sqnorms: dict, rows: torch.Tensor,
                      provenance: dict) -> dict:
    """A partition's top-k of a fused pass, and its documents' squared norms.

    Args:
        top: ``{method: (values [Q, k'], rows within the file [Q, k'])}``.
        sqnorms: ``{stage: [N]}`` each kept document's squared index norm (all shards).
        rows: ``[N]`` those documents' rows within the file.
    """
    tensors = {"doc_rows": rows.to(torch.int64)}
    tensors.update({f"sqnorm.{stage}": sq.to(torch.float64) for stage, sq in sqnorms.items()})
    for m, (values, top_rows) in top.items():
        tensors[f"{m}.values"], tensors[f"{m}.rows"] = values.to(torch.float64), top_rows.to(torch.int64)
    return run.write_piece(fused_rel(token, part.key), _tensor_bytes(tensors, {"methods": list(top)}),
                           {"partition": part.key, "file": part.file.url, "rows": [part.start, part.stop],
                            **provenance})


def fused_from_bytes(data: bytes) -> tuple[dict, dict, torch.Tensor]:
    """A fused piece (:func:`write_fused_piece`) as ``(top, sqnorms, rows)``, the arguments it was written from."""
    t = st_load(data)
    top = {m: (t[f"{m}.values"], t[f"{m}.rows"]) for m in _header_json(data)["methods"]}
    sqnorms = {k.removeprefix("sqnorm."): v for k, v in t.items() if k.startswith("sqnorm.")}
    return top, sqnorms, t["doc_rows"]


def read_fused_piece(run: RunDir, token: str, part: Partition) -> tuple[dict, dict, torch.Tensor]:
    """:func:`fused_from_bytes` of a verified fused piece."""
    return fused_from_bytes(run.read_piece(fused_rel(token, part.key)))


def queries_rel(shard: int) -> str:
    return f"queries/vectors.shard-{shard}.safetensors"


def _header_json(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["ray_influence"])


def _tensor_bytes(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    return st_save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata={"ray_influence": json.dumps(meta)})


def _parquet_bytes(table: pa.Table, metadata: dict | None = None) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k.encode(): v.encode() for k, v in metadata.items()}})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_parquet_piece(run: RunDir, rel: str) -> pa.Table:
    return pq.read_table(io.BytesIO(run.read_piece(rel)))


# ------------------------------------------------------------------------------ index


def write_index_piece(run: RunDir, stage: str, shard: int, part: Partition, docs: Sequence[Document],
                      flat: torch.Tensor, dtype: torch.dtype, provenance: dict) -> dict:
    """One partition's flat document gradients ``[N, D]`` at ``stage``'s model, for one shard.

    ``sqnorm`` (``[N]``, float64) is this shard's part of each document's squared norm;
    ``rows`` are the documents' rows within their file. ``provenance`` (the file's
    fingerprint, the rows dropped as duplicates) goes into the marker, so a rerun can tell
    whether the piece still describes the corpus.
    """
    tensors = {
        "grads": flat.to(dtype),
        "sqnorm": flat.to(torch.float64).square().sum(1),
        "rows": torch.tensor([d.row for d in docs], dtype=torch.int64),
    }
    meta = {"partition": part.key, "doc_ids": [d.doc_id for d in docs]}
    data = _tensor_bytes(tensors, meta)
    # A fast hash next to the marker's sha256, for the score stage (IndexPieceReader, _Checksum).
    fast = {"xxh3_64": xxhash.xxh3_64(data).hexdigest()} if xxhash is not None else {}
    return run.write_piece(index_rel(stage, shard, part.key), data,
                           {"partition": part.key, "docs": len(docs), "file": part.file.url,
                            "rows": [part.start, part.stop], **fast, **provenance})


def read_index_piece(run: RunDir, stage: str, shard: int, part: Partition) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grads [N, D], sqnorm [N], rows within the file [N])`` of a verified piece."""
    t = st_load(run.read_piece(index_rel(stage, shard, part.key)))
    return t["grads"], t["sqnorm"], t["rows"]


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64}
"""safetensors dtype codes of the tensors an index piece holds."""

READ_BLOCK_BYTES = 4 << 20
"""The background reader checks and publishes the piece in steps of this size."""


class _Checksum:
    """The running checksum the score stage verifies: ``xxh3_64`` when the marker has one, else ``sha256``.

    Index pieces record both (:func:`write_index_piece`). XXH3 is a 64-bit non-cryptographic
    hash that catches a torn or damaged file as surely for this purpose (any damage but
    for a 2^-64 chance) at about 20 GB/s, against sha256's 2 GB/s; hashing a piece then
    costs a fifth of the matmul that scores it instead of twice as much. Older markers,
    or a missing ``xxhash`` module, fall back to the sha256.
    """

    def __init__(self, marker: dict):
        self.kind = "xxh3_64" if "xxh3_64" in marker and xxhash is not None else "sha256"
        self.want = marker[self.kind]
        self._h = xxhash.xxh3_64() if self.kind == "xxh3_64" else hashlib.sha256()

    def update(self, data) -> None:
        self._h.update(data)

    def value(self) -> str:
        return self._h.hexdigest()


class _BackgroundRead(threading.Thread):
    """Brings ``size`` bytes of a piece into memory while checksumming them; publishes progress.

    A local file is memory-mapped (copy-on-write, never written), so nothing is copied:
    this thread's checksum pass faults the pages in ahead of the consumer. Other
    filesystems are read into ``scratch``, a buffer the caller keeps across pieces.
    """

    def __init__(self, run: RunDir, rel: str, size: int, checksum: _Checksum, scratch: bytearray):
        super().__init__(name=f"read {rel}", daemon=True)
        self.rundir, self.rel, self.size, self.checksum = run, rel, size, checksum
        self.available = 0
        self.overrun = False  # the file holds more bytes than the marker says
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._done = False
        self._map = None
        path = run.path(rel)
        if isinstance(run.fs, LocalFileSystem):
            with open(path, "rb") as fh:
                length = os.fstat(fh.fileno()).st_size
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if length else bytearray()
            self.overrun = length > size
            self.buffer = self._map
        else:
            self.buffer = scratch
        self._length = len(self.buffer) if self._map is not None else None

    def run(self) -> None:  # noqa: D401 - threading.Thread API
        try:
            view = memoryview(self.buffer)
            if self._map is not None:
                self._publish_mapped(view)
            else:
                self._read_into(view)
        except BaseException as e:  # handed to the consumer thread
            self.error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _advance(self, view: memoryview, end: int) -> None:
        self.checksum.update(view[self.available:end])
        with self._cond:
            self.available = end
            self._cond.notify_all()

    def _publish_mapped(self, view: memoryview) -> None:
        stop = min(self.size, self._length)
        while self.available < stop:
            self._advance(view, min(self.available + READ_BLOCK_BYTES, stop))

    def _read_into(self, view: memoryview) -> None:
        with self.rundir.fs.open(self.rundir.path(self.rel), "rb") as fh:
            readinto = getattr(fh, "readinto", None)
            while self.available < self.size:
                end = min(self.available + READ_BLOCK_BYTES, self.size)
                if readinto is not None:
                    n = readinto(view[self.available:end])
                else:  # a file object without readinto
                    data = fh.read(end - self.available)
                    n = len(data)
                    view[self.available:self.available + n] = data
                if not n:
                    break  # shorter than the marker says
                self._advance(view, self.available + n)
            self.overrun = bool(fh.read(1))

    def wait_for(self, end: int) -> bool:
        """Blocks until the first ``end`` bytes are in memory; False if they never will be."""
        with self._cond:
            while self.available < end and not self._done:
                self._cond.wait()
            return self.available >= end

    def close(self) -> None:
        """Unmaps a mapped file (kept alive instead while a tensor still views it)."""
        if isinstance(self._map, mmap.mmap):
            try:
                self._map.close()
            except BufferError:
                pass
        self._map = self.buffer = None


class IndexPieceReader:
    """Streams index pieces block by block, overlapping the read and checksum with the consumer.

    A background thread brings the piece into memory (a memory map for local files, else
    a buffer kept across pieces) and checksums it as it goes; the calling thread gets the
    rows of ``grads`` as soon as they have arrived. The size and checksum are verified
    against the piece's marker before :meth:`scan` returns, so a damaged piece raises
    :class:`~ray_influence.rundir.DamagedArtifact` and whatever was computed from it is
    dropped with the exception.

    Args:
        run: the run directory.
        block_rows_bytes: about how many bytes of ``grads`` each ``on_rows`` call gets. Larger
            blocks make fewer passes over the query matrix; smaller ones start sooner.
    """

    def __init__(self, run: RunDir, block_rows_bytes: int = 64 << 20):
        self.run = run
        self.block_rows_bytes = block_rows_bytes
        self._scratch = bytearray()

    def scan(self, stage: str, shard: int, part: Partition,
             on_rows: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Calls ``on_rows(grads[r0:r1])`` for consecutive row blocks of the piece's ``[N, D]`` grads.

        The blocks are read-only views valid only during the call.

        Returns:
            ``(sqnorm [N], rows within the file [N])``, like :func:`read_index_piece`.

        Raises:
            DamagedArtifact: no marker, a size or checksum mismatch (found after the blocks
                were handed out), or a file that is not an index piece.
        """
        rel = index_rel(stage, shard, part.key)
        marker = self.run.piece_done(rel)
        if marker is None:
            raise DamagedArtifact(f"{self.run.url}/{rel}: no completed piece (missing file or marker)")
        size = int(marker["bytes"])
        if not isinstance(self.run.fs, LocalFileSystem) and len(self._scratch) < size:
            self._scratch = bytearray(size)
        checksum = _Checksum(marker)
        reader = _BackgroundRead(self.run, rel, size, checksum, self._scratch)
        reader.start()
        try:
            layout = self._layout(reader, size)
            if layout is not None:
                base, header, (dtype, n, d, start) = layout
                row_bytes = d * torch.empty(0, dtype=dtype).element_size()
                step = max(1, self.block_rows_bytes // max(1, row_bytes))
                for r0 in range(0, n, step):
                    r1 = min(n, r0 + step)
                    if not reader.wait_for(start + r1 * row_bytes):
                        break  # truncated: reported below
                    on_rows(self._tensor(reader, dtype, (r1 - r0) * d, start + r0 * row_bytes).view(r1 - r0, d))
            reader.join()
            if reader.error is not None:
                raise reader.error
            got = checksum.value()
            if reader.available != size or reader.overrun or got != checksum.want:
                raise DamagedArtifact(
                    f"{self.run.url}/{rel}: checksum mismatch ({reader.available}{'+' if reader.overrun else ''} "
                    f"bytes, {checksum.kind} {got}; marker says {size} bytes, {checksum.want})"
                )
            if layout is None:
                raise DamagedArtifact(f"{self.run.url}/{rel}: not an index piece (unreadable safetensors header)")
            out = []
            for key in ("sqnorm", "rows"):
                t = header[key]
                count = int(torch.tensor(t["shape"], dtype=torch.int64).prod())
                dtype = _ST_DTYPES[t["dtype"]]
                out.append(self._tensor(reader, dtype, count, base + t["data_offsets"][0]).clone()
                           if count else torch.zeros(0, dtype=dtype))
            return out[0], out[1]
        finally:
            reader.join()
            reader.close()

    @staticmethod
    def _tensor(reader: _BackgroundRead, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
        return torch.frombuffer(reader.buffer, dtype=dtype, count=count, offset=offset)

    def _layout(self, reader: _BackgroundRead, size: int) -> tuple | None:
        """``(data start, header, (grads dtype, N, D, grads start))`` once the header is in; None if unreadable."""
        if not reader.wait_for(8):
            return None
        base = 8 + int.from_bytes(bytes(reader.buffer[:8]), "little")
        if base > size or not reader.wait_for(base):
            return None
        try:
            header = json.loads(bytes(reader.buffer[8:base]))
            g = header["grads"]
            n, d = (int(x) for x in g["shape"])
            dtype, start = _ST_DTYPES[g["dtype"]], base + int(g["data_offsets"][0])
            if start + n * d * torch.empty(0, dtype=dtype).element_size() > size:
                return None
            return base, header, (dtype, n, d, start)
        except (ValueError, KeyError, TypeError):
            return None


def write_docs_piece(run: RunDir, part: Partition, docs: Sequence[Document], examples: Sequence[Example],
                     chars: int) -> dict:
    table = pa.table({
        "doc_id": [d.doc_id for d in docs],
        "doc_text": [d.text[:chars] for d in docs],
        "row": pa.array([d.row for d in docs], pa.int64()),
        "n_tokens": pa.array([len(e) for e in examples], pa.int32()),
        "truncated": pa.array([e.truncated for e in examples], pa.bool_()),
    })
    return run.write_piece(docs_rel(part.key), _parquet_bytes(table), {"partition": part.key, "docs": len(docs)})


def write_skipped_piece(run: RunDir, part: Partition, skipped: Sequence[tuple[Any, str]]) -> dict:
    table = pa.table({"doc_id": pa.array([str(d) for d, _ in skipped], pa.string()),
                      "reason": pa.array([r for _, r in skipped], pa.string())})
    return run.write_piece(skipped_rel(part.key), _parquet_bytes(table), {"partition": part.key, "skipped": len(skipped)})


# ---------------------------------------------------------------------------- queries


def _write_queries_table(run: RunDir, ids: Sequence[Any], records: Sequence[dict], qcfg) -> None:
    """``queries/queries.parquet``: the stored queries' ids, prompts and completions, in order."""
    table = pa.table({
        "query_id": list(ids),
        "prompt": [r[qcfg.prompt_column] for r in records],
        "completion": [r[qcfg.completion_column] for r in records],
    })
    run.write_piece(QUERIES_TABLE, _parquet_bytes(table))


QUERIES_TABLE = "queries/queries.parquet"


def stored_query_ids(run: RunDir) -> list:
    """The stored queries' ids, in the order every query piece holds them."""
    return read_parquet_piece(run, QUERIES_TABLE).column("query_id").to_pylist()


def write_query_vectors(run: RunDir, shard: int, ids: Sequence[Any], records: Sequence[dict], qcfg,
                        vectors: dict[str, torch.Tensor]) -> dict:
    """Flat query vectors ``{method: [Q, D]}`` (float64) with the query ids, plus the queries table."""
    meta = {"query_ids": list(ids)}
    marker = run.write_piece(queries_rel(shard), _tensor_bytes({m: v.to(torch.float64) for m, v in vectors.items()}, meta),
                             {"queries": len(ids), "methods": sorted(vectors)})
    if shard == 0:
        _write_queries_table(run, ids, records, qcfg)
    return marker


def read_query_vectors(run: RunDir, shard: int) -> dict:
    data = run.read_piece(queries_rel(shard))
    return {"ids": _header_json(data)["query_ids"], "vectors": st_load(data)}


QUERY_FACTOR_FIELDS = ("left", "right", "sqnorm", "kept")


def write_query_factors(run: RunDir, shard: int, ids: Sequence[Any], records: Sequence[dict], qcfg,
                        factors: dict[str, dict[str, "QueryFactors"]], rank: int) -> dict:
    """Low-rank query factors ``{method: {module: QueryFactors}}`` of one shard's modules (exact mode).

    Tensors are named ``<method>/<module>/<field>``; the header keeps the query ids, the
    module order and the configured rank.
    """
    from .lowrank import QueryFactors  # noqa: F401 - the type of ``factors``' values

    tensors = {f"{m}/{n}/{field}": getattr(f, field).to(torch.float64)
               for m, per in factors.items() for n, f in per.items() for field in QUERY_FACTOR_FIELDS}
    modules = list(next(iter(factors.values()))) if factors else []
    meta = {"query_ids": list(ids), "mode": "exact", "methods": list(factors), "modules": modules,
            "query_rank": rank}
    marker = run.write_piece(queries_rel(shard), _tensor_bytes(tensors, meta),
                             {"queries": len(ids), "methods": sorted(factors), "query_rank": rank})
    if shard == 0:
        _write_queries_table(run, ids, records, qcfg)
    return marker


def read_query_factors(run: RunDir, shard: int) -> dict:
    """``{"ids": [...], "factors": {method: {module: QueryFactors}}}`` of one shard (exact mode)."""
    from .lowrank import QueryFactors

    data = run.read_piece(queries_rel(shard))
    meta, t = _header_json(data), st_load(data)
    if meta.get("mode") != "exact":
        raise ValueError(f"{queries_rel(shard)} holds projected query vectors, not low-rank factors; "
                         "rerun the query stage in scoring.mode: exact")
    factors = {m: {n: QueryFactors(*(t[f"{m}/{n}/{field}"] for field in QUERY_FACTOR_FIELDS))
                   for n in meta["modules"]} for m in meta["methods"]}
    return {"ids": meta["query_ids"], "factors": factors}


QUERY_ENERGY_TABLE = "query_energy.parquet"
"""Per query, method and module: the rank kept and the share of ``‖u‖²`` it retains (exact mode)."""


def write_query_energy(run: RunDir, rows: Sequence[dict]) -> None:
    """``{run_dir}/query_energy.parquet``: query_id, method, module, rank, energy, retained_energy."""
    cols = ("query_id", "method", "module", "rank", "energy", "retained_energy")
    table = pa.table({
        "query_id": [r["query_id"] for r in rows],
        "method": pa.array([r["method"] for r in rows], pa.string()),
        "module": pa.array([r["module"] for r in rows], pa.string()),
        "rank": pa.array([r["rank"] for r in rows], pa.int32()),
        "energy": pa.array([r["energy"] for r in rows], pa.float64()),
        "retained_energy": pa.array([r["retained_energy"] for r in rows], pa.float64()),
    }) if rows else pa.schema([(c, t) for c, t in zip(cols, (pa.string(), pa.string(), pa.string(), pa.int32(),
                                                              pa.float64(), pa.float64()))]).empty_table()
    run.write_bytes(QUERY_ENERGY_TABLE, _parquet_bytes(table))


def energy_rows(ids: Sequence[Any], factors: dict[str, dict[str, "QueryFactors"]]) -> list[dict]:
    """One row per (query, method, module) of :func:`write_query_energy` from one shard's factors."""
    rows = []
    for m, per in factors.items():
        for n, f in per.items():
            for q, qid in enumerate(ids):
                total, kept = float(f.sqnorm[q]), float(f.kept[q])
                rows.append({"query_id": qid, "method": m, "module": n, "rank": f.rank, "energy": total,
                             "retained_energy": kept / total if total > 0 else 1.0})
    return rows


# ---------------------------------------------------------------------------- results


def results_table(query_ids: Sequence[Any], values: torch.Tensor, positions: torch.Tensor,
                  docs_by_position: dict[int, tuple[Any, str]]) -> pa.Table:
    """One row per (query, rank): query_id, rank, doc_id, score, doc_text."""
    qid, rank, doc_id, score, text = [], [], [], [], []
    for q, query_id in enumerate(query_ids):
        for r in range(values.shape[1]):
            d_id, d_text = docs_by_position[int(positions[q, r])]
            qid.append(query_id)
            rank.append(r + 1)
            doc_id.append(d_id)
            score.append(float(values[q, r]))
            text.append(d_text)
    return pa.table({
        "query_id": qid,
        "rank": pa.array(rank, pa.int32()),
        "doc_id": doc_id,
        "score": pa.array(score, pa.float64()),
        "doc_text": pa.array(text, pa.string()),
    })


def write_results(run: RunDir, method: str, table: pa.Table, metadata: dict) -> None:
    """``results/method=<m>/part-0.parquet``, replacing the previous result of that method."""
    rel = f"results/method={method}/part-0.parquet"
    run.write_bytes(rel, _parquet_bytes(table, {"ray_influence": json.dumps(metadata, default=str)}))


TOKEN_TABLES = ("token_influence", "layer_influence")
"""Per-token and per-module influence of the top documents, hive-partitioned by method like results."""


def method_table_rel(table: str, method: str) -> str:
    return f"{table}/method={method}/part-0.parquet"


def write_method_table(run: RunDir, table_name: str, method: str, table: pa.Table, metadata: dict) -> None:
    """``{table_name}/method=<m>/part-0.parquet``, replacing the previous one of that method."""
    run.write_bytes(method_table_rel(table_name, method),
                    _parquet_bytes(table, {"ray_influence": json.dumps(metadata, default=str)}))


def write_skipped_summary(run: RunDir, parts: Sequence[Partition]) -> int:
    """Concatenates every partition's skipped rows into ``skipped.parquet``; returns the count."""
    tables = [read_parquet_piece(run, skipped_rel(p.key)) for p in parts if run.piece_done(skipped_rel(p.key))]
    schema = pa.schema([("doc_id", pa.string()), ("reason", pa.string())])
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    run.write_bytes("skipped.parquet", _parquet_bytes(table))
    return table.num_rows
