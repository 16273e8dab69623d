"""The run directory: atomic writes, checksummed pieces and their manifest markers.

Every artefact lives under ``run_dir`` (any fsspec URL). A piece is written to a temporary
name and renamed into place; then a small JSON *marker* records its size and sha256. A
piece counts as done only when its marker exists, and a reader verifies the checksum, so
a crash between the two writes, or a damaged file, is never taken for a result.

Layout (``<stage>`` is ``pretrained`` or ``finetuned``, ``<part>`` a partition key):

    run.json                              the config the run was started with
    factors/<stage>.shard-<s>.safetensors EK-FAC factors (+ .json marker)
    index/<stage>/shard-<s>/<part>.safetensors  scoring.mode index: projected document gradients (+ marker)
    docs/<part>.parquet                   doc_id, doc_text, n_tokens, truncated (+ marker)
    skipped/<part>.parquet                rows skipped in a partition (+ marker)
    queries/vectors.shard-<s>.safetensors the shard's preconditioned queries: rank-r factors
                                          (mode exact) or projected vectors (index, fused) (+ marker)
    queries/queries.parquet               the stored queries: query_id, prompt, completion (+ marker)
    query_energy.parquet                  mode exact: the share of each query's |u|^2 the rank keeps
    fused/<token>/<part>.safetensors      modes exact and fused: a partition's top-k for one query
                                          set (<token>), and its documents' squared norms (+ marker)
    results/method=<m>/part-0.parquet     top-k per query
    token_influence/method=<m>/part-0.parquet   per-token terms of the top documents
    layer_influence/method=<m>/part-0.parquet   per-module terms of the top documents
    report.html                           `ray-influence report`
    skipped.parquet                       every skipped row: doc_id, reason
    skipped_queries.parquet               every skipped query of the last query stage: query_id, reason
    manifest.json                         stages done, counts and timings
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import uuid
from typing import Any

import fsspec

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


class DamagedArtifact(RuntimeError):
    """A piece whose bytes do not match its marker's checksum."""


def safe_name(name: str) -> str:
    """Refuses names that could escape a directory (``..``, ``/``, odd characters)."""
    if not _SAFE.match(name) or ".." in name:
        raise ValueError(f"unsafe file name {name!r}")
    return name


class RunDir:
    """Reads and writes artefacts under one fsspec URL."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))

    def path(self, rel: str) -> str:
        parts = rel.split("/")
        for p in parts:
            safe_name(p)
        return posixpath.join(self.root, *parts)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    # ----------------------------------------------------------------- raw bytes

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically writes ``data``: a temporary name in the same directory, then a rename."""
        final = self.path(rel)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        self.fs.mv(tmp, final)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as fh:
            return fh.read()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def remove(self, rel: str, recursive: bool = False) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)

    def listdir(self, rel: str) -> list[str]:
        """Base names under ``rel`` (empty if it does not exist)."""
        p = self.path(rel) if rel else self.root
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    # ----------------------------------------------------------- checksummed pieces

    @staticmethod
    def marker_of(rel: str) -> str:
        return rel + ".json"

    def write_piece(self, rel: str, data: bytes, meta: dict | None = None) -> dict:
        """Writes ``data`` then its marker (size, sha256 and ``meta``); returns the marker."""
        self.write_bytes(rel, data)
        marker = {"file": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **(meta or {})}
        self.write_json(self.marker_of(rel), marker)
        return marker

    def piece_done(self, rel: str) -> dict | None:
        """The marker of a completed piece, or None (no marker, or no file)."""
        m = self.marker_of(rel)
        if not self.exists(m) or not self.exists(rel):
            return None
        try:
            return self.read_json(m)
        except (ValueError, OSError):
            return None

    def read_piece(self, rel: str) -> bytes:
        """The piece's bytes, verified against its marker.

        Raises:
            DamagedArtifact: no marker, or size/checksum mismatch.
        """
        marker = self.piece_done(rel)
        if marker is None:
            raise DamagedArtifact(f"{self.url}/{rel}: no completed piece (missing file or marker)")
        data = self.read_bytes(rel)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != marker["bytes"] or digest != marker["sha256"]:
            raise DamagedArtifact(
                f"{self.url}/{rel}: checksum mismatch ({len(data)} bytes, sha256 {digest[:12]}; "
                f"marker says {marker['bytes']} bytes, {marker['sha256'][:12]})"
            )
        return data

    def invalidate(self, rel: str) -> None:
        """Drops a piece and its marker (so it is recomputed)."""
        self.remove(self.marker_of(rel))
        self.remove(rel)
