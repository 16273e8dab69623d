"""The worker's methods run without Ray, on one batch of real files."""

from __future__ import annotations

import torch

from precision import FLOAT64_RTOL, assert_close
from world import build_world
from ray_influence import attribution
from ray_influence.config import config_from_dict
from ray_influence.data import list_files, plan_partitions
from ray_influence.rundir import DamagedArtifact, RunDir
from ray_influence.scoring import flatten
from ray_influence.store import index_rel, read_index_piece
from ray_influence.worker import ReplicaActor as Worker

import pytest


def test_index_piece_round_trips_and_is_checked(tmp_path):
    cfg = config_from_dict(build_world(tmp_path))
    worker = Worker(cfg)
    part = plan_partitions(list_files(cfg.corpus.path), cfg.corpus.partition_docs)[1]
    summary = worker.index(part, ["pretrained"])
    assert summary["docs"] == len(part) and summary["skipped"] == 0
    grads, sqnorm, positions = read_index_piece(worker.run, "pretrained", 0, part)
    docs, _ = worker.corpus_documents(part)
    want = attribution.document_gradients(worker.model("pretrained"), worker.corpus_examples(docs),
                                          worker.specs("pretrained"))
    want = flatten(want.grads, worker.module_names())
    # Float64 throughout (GPT-NeoX's one float32 step is its table of rotary angles); the
    # worker batches differently, so the bound is relative to the gradients' magnitude.
    assert_close(grads, want, FLOAT64_RTOL, "index piece vs document_gradients")
    assert torch.allclose(sqnorm, want.square().sum(1))
    assert positions.tolist() == list(range(part.start, part.stop))
    # A flipped byte is caught by the marker's checksum, never read as gradients.
    path = tmp_path / "run" / index_rel("pretrained", 0, part.key)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedArtifact, match="checksum"):
        read_index_piece(RunDir(cfg.run_dir), "pretrained", 0, part)


def test_covariance_share_reads_only_its_rows(tmp_path):
    cfg = config_from_dict(build_world(tmp_path))
    worker = Worker(cfg)
    part = plan_partitions(list_files(cfg.corpus.path), cfg.corpus.partition_docs)[0]
    stats = worker.covariance("pretrained", [(part, [0, 2])])
    docs, _ = worker.corpus_documents(part)
    examples = worker.corpus_examples([docs[0], docs[2]])
    name = worker.module_names()[0]
    assert next(iter(stats.values())).n_tokens == sum(len(e) for e in examples)
    ref = attribution.covariance_pass(worker.model("pretrained"), examples, worker.specs("pretrained"),
                                      "true", cfg.ekfac.fisher_samples, cfg.ekfac.seed)
    assert_close(stats[name].g_sum, ref[name].g_sum, FLOAT64_RTOL, f"{name} G sum")


def test_streamed_piece_equals_the_whole_read_and_is_checked(tmp_path):
    from ray_influence.store import IndexPieceReader, read_query_vectors

    cfg = config_from_dict(build_world(tmp_path))
    worker = Worker(cfg)
    part = plan_partitions(list_files(cfg.corpus.path), cfg.corpus.partition_docs)[0]
    worker.index(part, ["pretrained"])
    grads, sqnorm, rows = read_index_piece(worker.run, "pretrained", 0, part)
    reader = IndexPieceReader(worker.run, block_rows_bytes=3 * grads.shape[1] * grads.element_size())
    blocks: list[torch.Tensor] = []
    for _ in range(2):  # the second scan reuses the reader's buffer
        blocks.clear()
        got_sq, got_rows = reader.scan("pretrained", 0, part, lambda b: blocks.append(b.clone()))
        assert len(blocks) == -(-grads.shape[0] // 3) and torch.equal(torch.cat(blocks), grads)
        assert torch.equal(got_sq, sqnorm) and torch.equal(got_rows, rows)
    # The worker's scores come from the streamed piece and equal one float64 matmul (float64 index).
    worker.queries(["grad_dot"])
    u = read_query_vectors(worker.run, 0)["vectors"]["grad_dot"]
    partial, got_rows = worker.partial_scores(part, ["grad_dot"])
    scores, got_sq, query_sq = partial["grad_dot"]
    # A dot product's round-off is relative to |u| |g| (Cauchy-Schwarz), not to the score,
    # which may be near 0.
    assert_close(scores, u @ grads.T, FLOAT64_RTOL, "streamed scores vs one matmul",
                 scale=float((u.norm(dim=1)[:, None] * grads.norm(dim=1)[None, :]).max()))
    assert torch.equal(got_rows, rows)
    assert torch.equal(got_sq, sqnorm) and torch.allclose(query_sq, u.square().sum(1), rtol=1e-12, atol=0)
    # Damage after the blocks were handed out is still caught before scan returns.
    path = tmp_path / "run" / index_rel("pretrained", 0, part.key)
    good = path.read_bytes()
    for bad in (good[:-5], good + b"x", good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]):
        path.write_bytes(bad)
        with pytest.raises(DamagedArtifact, match="checksum"):
            IndexPieceReader(RunDir(cfg.run_dir)).scan("pretrained", 0, part, lambda b: None)


def test_streamed_piece_on_a_non_local_filesystem_and_with_an_old_marker(tmp_path, monkeypatch):
    """The copy path (no memory map) and a marker with only a sha256 give the same piece."""
    import json as _json

    from ray_influence import store
    from ray_influence.store import IndexPieceReader

    cfg = config_from_dict(build_world(tmp_path))
    worker = Worker(cfg)
    part = plan_partitions(list_files(cfg.corpus.path), cfg.corpus.partition_docs)[0]
    worker.index(part, ["pretrained"])
    grads, sqnorm, rows = read_index_piece(worker.run, "pretrained", 0, part)
    marker_path = tmp_path / "run" / (index_rel("pretrained", 0, part.key) + ".json")
    marker = _json.loads(marker_path.read_text())
    assert "xxh3_64" in marker and "sha256" in marker
    monkeypatch.setattr(store, "LocalFileSystem", type("NotLocal", (), {}))  # take the readinto path
    for m in (marker, {k: v for k, v in marker.items() if k != "xxh3_64"}):
        marker_path.write_text(_json.dumps(m))
        blocks: list[torch.Tensor] = []
        reader = IndexPieceReader(RunDir(cfg.run_dir), block_rows_bytes=1)
        got_sq, got_rows = reader.scan("pretrained", 0, part, lambda b: blocks.append(b.clone()))
        assert torch.equal(torch.cat(blocks), grads) and torch.equal(got_sq, sqnorm) and torch.equal(got_rows, rows)
    path = tmp_path / "run" / index_rel("pretrained", 0, part.key)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(DamagedArtifact, match="sha256"):
        IndexPieceReader(RunDir(cfg.run_dir)).scan("pretrained", 0, part, lambda b: None)
