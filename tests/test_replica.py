"""The replica layer's seams: the pass spec, the skip-and-rerun loop, per-shard answers."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from world import build_world
from ray_influence.config import config_from_dict
from ray_influence.data import list_files, plan_partitions
from ray_influence.pass_spec import PassKind, PassSpec
from ray_influence.passes import run_with_rerun
from ray_influence.replica import LocalReplica
from ray_influence.scoring import Method
from ray_influence.shard_host import ShardHost
from ray_influence.tokens import Example


def test_pass_spec_is_frozen_named_and_checked():
    spec = PassSpec.gradients("pretrained", projected=True)
    assert spec.kind is PassKind.GRADIENTS and spec.projected and spec.corpus
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.stage = "finetuned"
    assert PassSpec("scores", "finetuned", methods=("x",)).kind is PassKind.SCORES  # kinds parse from strings
    assert PassSpec.scores("pretrained", [Method.GRAD_DOT]).methods == ("grad_dot",)
    assert PassSpec.terms("pretrained", [("grad_dot", 3)]).pairs == (("grad_dot", 3),)
    assert not PassSpec.covariance("finetuned").corpus
    for bad in (lambda: PassSpec.lambdas("pretrained", []), lambda: PassSpec.scores("pretrained", []),
                lambda: PassSpec.terms("pretrained", []), lambda: PassSpec.covariance("base"),
                lambda: PassSpec("hessian", "pretrained")):
        with pytest.raises(ValueError):
            bad()


def _examples(keys: str) -> list[Example]:
    return [Example(k, (1, 2), (False, True)) for k in keys]


@pytest.mark.parametrize("window", [1, None])
def test_run_with_rerun_skips_non_finite_rows_and_reruns_the_rest(window):
    bad_keys = {"b", "e", "f"}
    seen: list[list[str]] = []

    def run(groups):
        for g in groups:
            seen.append([e.key for e in g])
            loss = torch.tensor([float("nan") if e.key in bad_keys else float(ord(e.key)) for e in g],
                                dtype=torch.float64)
            yield g, loss

    groups = [_examples("ab"), _examples("cd"), _examples("ef")]
    kept, losses, skipped = run_with_rerun(groups, run, window)
    assert skipped == ["b", "e", "f"]
    assert sorted(kept) == ["a", "c", "d"] and losses.tolist() == [float(ord(k)) for k in kept]
    # window 1: a group's rerun follows it at once; all at once: the reruns come last
    assert kept == (["a", "c", "d"] if window == 1 else ["c", "d", "a"])
    # an all-bad group is not rerun
    assert seen == ([["a", "b"], ["a"], ["c", "d"], ["e", "f"]] if window == 1
                    else [["a", "b"], ["c", "d"], ["e", "f"], ["a"]])


def test_local_replica_answers_per_shard(tmp_path):
    from ray_influence import shard_steps
    from ray_influence.worker import ReplicaActor

    cfg = config_from_dict(build_world(tmp_path))
    host = ShardHost(cfg)
    replica = LocalReplica(host)
    part = plan_partitions(list_files(cfg.corpus.path), cfg.corpus.partition_docs)[0]
    docs, _ = host.corpus_documents(part)
    examples = host.corpus_examples(docs[:3])
    run = replica.run(PassSpec.covariance("pretrained"), examples)
    per_shard = replica.finish(run, shard_steps.collector_result)
    assert len(per_shard) == 1 and set(per_shard[0]) == set(host.specs("pretrained"))
    assert replica.each(shard_steps.shard_specs, "pretrained") == [list(host.specs("pretrained").values())]
    # The actor's fit pass gives the same sums, per shard; an empty share gives None per module.
    actor = ReplicaActor(cfg)
    got = actor._fit(PassSpec.covariance("pretrained"), [(part, [0, 1, 2])], fetch=True)
    name = next(iter(per_shard[0]))
    assert len(got) == 1 and torch.equal(got[0][name].a_sum, per_shard[0][name].a_sum)
    assert actor._fit(PassSpec.covariance("pretrained"), [], fetch=True) == [{n: None for n in host.specs("pretrained")}]


def test_sinks_name_their_pieces_and_resume_from_them(tmp_path):
    from ray_influence.corpus_sinks import FusedScoreSink, IndexSink
    from ray_influence.rundir import DamagedArtifact, RunDir
    from ray_influence.store import docs_rel, fused_rel, index_rel, skipped_rel, write_fused_piece

    cfg = config_from_dict(build_world(tmp_path))
    run = RunDir(cfg.run_dir)
    part = plan_partitions(list_files(cfg.corpus.path), cfg.corpus.partition_docs)[1]
    index = IndexSink(("pretrained",))
    assert index.pieces(part, 2) == [(index_rel("pretrained", 0, part.key), True),
                                     (index_rel("pretrained", 1, part.key), True),
                                     (docs_rel(part.key), False), (skipped_rel(part.key), False)]
    assert index.resumed(run, part) == {}
    sink = FusedScoreSink(("pretrained",), ("grad_dot",), 2, "tok")
    assert sink.pieces(part, 1)[0] == (fused_rel("tok", part.key), True)
    rows = torch.tensor([part.start + 1, part.start + 3])
    top = {"grad_dot": (torch.tensor([[2.0, 1.0]], dtype=torch.float64), rows.clone()[None, :])}
    write_fused_piece(run, "tok", part, top, {"pretrained": torch.ones(2, dtype=torch.float64)}, rows, {})
    values, positions = sink.resumed(run, part)["top_k"]["grad_dot"]
    assert torch.equal(values, top["grad_dot"][0]) and positions.tolist() == [[part.position(r) for r in rows.tolist()]]
    replica = types.SimpleNamespace(host=types.SimpleNamespace(run=run))  # a score sink reads its own piece
    assert sink.doc_sqnorms(replica, "pretrained", part) == {r: 1.0 for r in rows.tolist()}
    path = tmp_path / "run" / fused_rel("tok", part.key)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DamagedArtifact):
        sink.resumed(run, part)
