"""The worker's methods run without Ray, on one batch of real files."""

from __future__ import annotations

import torch

from world import build_world
from ray_influence import attribution
from ray_influence.config import config_from_dict
from ray_influence.data import list_files, plan_partitions
from ray_influence.rundir import DamagedArtifact, RunDir
from ray_influence.scoring import flatten
from ray_influence.store import index_rel, read_index_piece
from ray_influence.worker import Worker

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
    assert torch.allclose(grads, want, rtol=1e-12, atol=1e-14)
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
    assert torch.allclose(stats[name].g_sum, ref[name].g_sum, rtol=1e-12)
