"""What each stage writes to the run directory, and how it is read back.

Tensors go to safetensors (with JSON metadata in the header), tables to Parquet; every
piece goes through :meth:`RunDir.write_piece`, so it is atomic and checksummed. See
:mod:`ray_influence.rundir` for the layout.
"""

from __future__ import annotations

import io
import json
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .data import Document, Partition
from .rundir import RunDir
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
    return run.write_piece(index_rel(stage, shard, part.key), _tensor_bytes(tensors, meta),
                           {"partition": part.key, "docs": len(docs), "file": part.file.url,
                            "rows": [part.start, part.stop], **provenance})


def read_index_piece(run: RunDir, stage: str, shard: int, part: Partition) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grads [N, D], sqnorm [N], rows within the file [N])`` of a verified piece."""
    t = st_load(run.read_piece(index_rel(stage, shard, part.key)))
    return t["grads"], t["sqnorm"], t["rows"]


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


def write_query_vectors(run: RunDir, shard: int, ids: Sequence[Any], records: Sequence[dict], qcfg,
                        vectors: dict[str, torch.Tensor]) -> dict:
    """Flat query vectors ``{method: [Q, D]}`` (float64) with the query ids, plus the queries table."""
    meta = {"query_ids": list(ids)}
    marker = run.write_piece(queries_rel(shard), _tensor_bytes({m: v.to(torch.float64) for m, v in vectors.items()}, meta),
                             {"queries": len(ids), "methods": sorted(vectors)})
    if shard == 0:
        table = pa.table({
            "query_id": list(ids),
            "prompt": [r[qcfg.prompt_column] for r in records],
            "completion": [r[qcfg.completion_column] for r in records],
        })
        run.write_piece("queries/queries.parquet", _parquet_bytes(table))
    return marker


def read_query_vectors(run: RunDir, shard: int) -> dict:
    data = run.read_piece(queries_rel(shard))
    return {"ids": _header_json(data)["query_ids"], "vectors": st_load(data)}


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
