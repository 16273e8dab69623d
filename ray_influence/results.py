"""What the job writes at the end of scoring: result tables with the documents' text, the
token-influence plan and tables, and the metadata every result file records."""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from typing import Any, Sequence

import ray

from . import __version__
from .config import Config
from .data import Partition
from .rundir import RunDir
from .scoring import Method
from .store import docs_rel, read_parquet_piece, results_table, stored_query_ids, write_results


def write_result_tables(run: RunDir, cfg: Config, parts: Sequence[Partition], merged: dict) -> dict:
    """Writes ``results/<method>`` from the merged top-k ``{method: (values [Q, k], positions [Q, k])}``;
    only the partitions holding a top document are read (for its id and text). Returns the stage summary."""
    query_ids = stored_query_ids(run)
    offsets = [p.offset for p in parts]
    wanted: dict[int, set[int]] = defaultdict(set)
    for values, positions in merged.values():
        for pos in positions.reshape(-1).tolist():
            wanted[bisect.bisect_right(offsets, pos) - 1].add(pos)
    docs_by_position: dict[int, tuple[Any, str]] = {}
    for i, positions in wanted.items():
        part = parts[i]
        table = read_parquet_piece(run, docs_rel(part.key)).to_pydict()
        for d_id, text, row in zip(table["doc_id"], table["doc_text"], table["row"]):
            if part.position(row) in positions:
                docs_by_position[part.position(row)] = (d_id, text)
    meta = run_metadata(cfg)
    for method, (values, positions) in merged.items():
        write_results(run, method, results_table(query_ids, values, positions, docs_by_position), meta)
    return {"methods": list(merged), "queries": len(query_ids), "top_k": cfg.scoring.top_k,
            "results": f"{cfg.run_dir}/results"}


def token_requests(topk: dict, parts: Sequence[Partition], top: int, n_chunks: int) -> tuple[list, dict]:
    """The documents whose token influence to compute: each query's ``top`` documents per method.

    Returns:
        ``([(stage, [DocRequest])] chunks, about n_chunks of them), {(method, query, position): rank}``.
    """
    from .token_influence import DocRequest

    offsets = [p.offset for p in parts]
    wanted: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))  # stage -> position -> pairs
    ranks: dict[tuple[str, int, int], int] = {}
    for method, (_, positions) in topk.items():
        stage = Method.parse(method).doc_model
        for q in range(positions.shape[0]):
            for r, pos in enumerate(positions[q, :top].tolist()):
                wanted[stage][pos].append((method, q))
                ranks[(method, q, pos)] = r + 1
    chunks = []
    for stage, by_pos in wanted.items():
        reqs = []
        for pos, pairs in sorted(by_pos.items()):
            part = parts[bisect.bisect_right(offsets, pos) - 1]
            reqs.append(DocRequest(part, pos - part.offset + part.start, pos, tuple(pairs)))
        size = max(1, -(-len(reqs) // n_chunks))
        chunks += [(stage, reqs[i:i + size]) for i in range(0, len(reqs), size)]
    return chunks, ranks


def run_metadata(cfg: Config) -> dict:
    """What a result file records about its run: models, config, versions, time."""
    import platform

    import pyarrow
    import torch
    import transformers

    return {
        "pretrained_model": cfg.pretrained_model,
        "finetuned_model": cfg.finetuned_model,
        "config": cfg.to_dict(),
        "versions": {"ray_influence": __version__, "ray": ray.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "pyarrow": pyarrow.__version__,
                     "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
