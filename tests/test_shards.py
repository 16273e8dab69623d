"""Model shards (pipeline parallel) on real Ray: the same factors, index and top-k as one shard.

Every architecture's adapter is exercised: GPT-NeoX and Llama (rotary), GPT-2 (learned
positions, Conv1D), Bloom (ALiBi). The models have 4 decoder blocks, so S = 2 splits them
[0, 2) [2, 4) and S = 3 unevenly, [0, 2) [2, 3) [3, 4). Everything runs in float64.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from world import build_world, write_config
from ray_influence.config import config_from_dict
from ray_influence.driver import run_job
from ray_influence.ekfac import ihvp
from ray_influence.factors_io import factors_from_bytes
from ray_influence.rundir import RunDir
from ray_influence.shard_model import chain, load_shard, shard_layout, split_blocks
from ray_influence.store import factors_rel, index_rel
from ray_influence.tokens import collate

from conftest import ARCHS, random_examples
from precision import FLOAT64_RTOL, assert_close

# Float64: the shards run the same HF modules on the same batches (the chained forward is
# bitwise the full one, test_chained_shards_reproduce_the_model_forward), so even Bloom's
# float32 softmax sees the same inputs; the sums are split by module. Every bound is
# relative to the magnitude of the values compared (a table's scores of one method and
# query, an iHVP vector, the index), since values near 0 carry the round-off of the large.
SCORE_RTOL = 1e-9
FACTOR_RTOL = 1e-9
INDEX_RTOL = FLOAT64_RTOL
LAYERS = 4


def job_config(root, arch: str) -> dict:
    cfg = build_world(root, arch=arch, layers=LAYERS)
    cfg["cluster"] = {**cfg["cluster"], "replicas": 1}
    cfg["scoring"]["token_influence_top"] = 2
    return cfg


def sharded(cfg: dict, shards: int, tag: str, **cluster) -> dict:
    out = copy.deepcopy(cfg)
    out["run_dir"] = f"{cfg['run_dir']}-{tag}"
    # 0.5 CPU per shard: three shards fit the fixture's 2 CPUs beside nothing else.
    out["cluster"] = {**cfg["cluster"], "shards": shards, "num_cpus_per_worker": 0.5, **cluster}
    return out


def results(run_dir: str, table: str = "results") -> list[tuple]:
    order = {"results": "method, query_id, rank", "token_influence": "method, query_id, doc_id, token_index",
             "layer_influence": "method, query_id, doc_id, module"}[table]
    return duckdb.sql(f"select * from read_parquet('{run_dir}/{table}/**/*.parquet', hive_partitioning=true) "
                      f"order by {order}").fetchall()


def module_actions(run_dir: str, stage: str, shards: int) -> dict[str, torch.Tensor]:
    """Every module's iHVP of a fixed vector, gathered over the shards' factor files."""
    out = {}
    for s in range(shards):
        factors, meta = factors_from_bytes(RunDir(run_dir).read_piece(factors_rel(stage, s)))
        for n, f in factors.items():
            gen = torch.Generator().manual_seed(len(out))
            out[n] = ihvp(torch.randn(f.shape, generator=gen, dtype=torch.float64), f)
    return out


def index_columns(run_dir: str, stage: str, shards: int) -> torch.Tensor:
    """The partition's flat index rows, the shards' columns side by side."""
    from safetensors.torch import load

    from pathlib import Path

    run = RunDir(run_dir)
    keys = sorted(p.name.removesuffix(".safetensors") for p in
                  (Path(run_dir) / "index" / stage / "shard-0").glob("*.safetensors"))
    parts = []
    for key in keys:
        parts.append(torch.cat([load(run.read_piece(index_rel(stage, s, key)))["grads"] for s in range(shards)], 1))
    return torch.cat(parts)


def assert_same_rows(got: list[tuple], want: list[tuple], score_cols: tuple[int, ...]) -> None:
    """Rows (query_id first, method last) equal but for their scores, which agree within
    SCORE_RTOL of the largest |score| of their method and query in ``want``."""
    assert len(got) == len(want)
    scale: dict[tuple, float] = {}
    for w in want:
        key = (w[-1], w[0])
        scale[key] = max([scale.get(key, 0.0)] + [abs(w[i]) for i in score_cols])
    for g, w in zip(got, want):
        assert [x for i, x in enumerate(g) if i not in score_cols] == [x for i, x in enumerate(w) if i not in score_cols]
        for i in score_cols:
            bound = SCORE_RTOL * max(abs(w[i]), scale[(w[-1], w[0])])
            assert abs(g[i] - w[i]) <= bound, f"{w}: score {g[i]!r}, |diff| {abs(g[i] - w[i]):.3e} > {bound:.3e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_shards_give_the_same_factors_index_and_results(arch, tmp_path, ray_local):
    cfg = job_config(tmp_path, arch)
    run_job(config_from_dict(cfg), progress=False)
    runs = {2: sharded(cfg, 2, "s2"), 3: sharded(cfg, 3, "s3")}
    for shards, other in runs.items():
        summary = run_job(config_from_dict(other), progress=False)
        assert len(summary["workers"]) == shards
        for stage in ("pretrained", "finetuned"):
            a, b = module_actions(cfg["run_dir"], stage, 1), module_actions(other["run_dir"], stage, shards)
            assert list(a) == list(b), "the shards' modules, in order, are the model's"
            for n in a:
                assert_close(b[n], a[n], FACTOR_RTOL, f"S={shards} {stage} {n}: iHVP of a fixed vector")
        ia, ib = index_columns(cfg["run_dir"], "pretrained", 1), index_columns(other["run_dir"], "pretrained", shards)
        assert ia.shape == ib.shape
        assert_close(ib, ia, INDEX_RTOL, f"S={shards} index")
        # results: (query_id, rank, doc_id, score, doc_text, method); scores at column 3
        assert_same_rows(results(other["run_dir"]), results(cfg["run_dir"]), (3,))
        assert_same_rows(results(other["run_dir"], "layer_influence"), results(cfg["run_dir"], "layer_influence"), (4,))
        assert_same_rows(results(other["run_dir"], "token_influence"), results(cfg["run_dir"], "token_influence"), (4,))


def test_two_sharded_replicas_match(tmp_path, ray_local):
    cfg = job_config(tmp_path, "gpt_neox")
    one = sharded(cfg, 2, "r1")
    two = sharded(cfg, 2, "r2", replicas=2, num_cpus_per_worker=0.5)
    run_job(config_from_dict(one), progress=False)
    summary = run_job(config_from_dict(two), progress=False)
    assert len(summary["workers"]) == 4 and {w["shard"] for w in summary["workers"]} == {0, 1}
    a, b = module_actions(one["run_dir"], "pretrained", 2), module_actions(two["run_dir"], "pretrained", 2)
    for n in a:
        assert_close(b[n], a[n], FACTOR_RTOL, f"{n}: iHVP of a fixed vector")
    assert_same_rows(results(two["run_dir"]), results(one["run_dir"]), (3,))
    # Fused: each shard scores its own columns during the corpus pass; no index is written.
    fused = sharded(cfg, 2, "fused", replicas=2, num_cpus_per_worker=0.5)
    fused["scoring"]["mode"] = "fused"
    run_job(config_from_dict(fused), progress=False)
    assert not (Path(fused["run_dir"]) / "index").exists()
    for table in ("results", "token_influence", "layer_influence"):
        col = 3 if table == "results" else 4
        assert_same_rows(results(fused["run_dir"], table), results(one["run_dir"], table), (col,))


def test_a_shard_holds_only_its_own_weights(tmp_path, ray_local):
    import ray

    from ray_influence.worker import remote_worker

    cfg = sharded(job_config(tmp_path, "gpt2"), 3, "w")
    layout = shard_layout(LAYERS, 3)
    actors = [remote_worker(config_from_dict(cfg), s, layout[s]) for s in range(3)]
    try:
        ray.get([a.module_names.remote("pretrained") for a in actors])  # loads the shard's model
        stats = ray.get([a.stats.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    full = dict(load_full(cfg["pretrained_model"]).named_parameters(remove_duplicate=False))
    everything = set()
    for (blocks, first, last), st in zip(layout, stats):
        own = set(st["parameters"])
        blocks_held = {int(n.split(".")[2]) for n in own if n.startswith("transformer.h.")}
        assert blocks_held == set(blocks), f"shard {st['shard']} holds blocks {sorted(blocks_held)}"
        assert ("transformer.wte.weight" in own) == first and ("transformer.wpe.weight" in own) == first
        assert ("lm_head.weight" in own) == last and ("transformer.ln_f.weight" in own) == last
        assert st["param_bytes"] == sum(full[n].numel() * full[n].element_size() for n in own)
        everything |= own
    assert everything == set(full), "the shards together hold the whole model"


def load_full(path: str):
    from ray_influence.models import load_model

    return load_model(path, "float64")


@pytest.mark.parametrize("arch", ARCHS)
def test_chained_shards_reproduce_the_model_forward(arch, tmp_path):
    cfg = build_world(tmp_path, arch=arch, layers=LAYERS)
    full = load_full(cfg["pretrained_model"])
    batch = collate(random_examples(4, vocab=full.config.vocab_size, seed=3))
    want = full(inputs_embeds=full.get_input_embeddings()(batch.input_ids),
                attention_mask=batch.token_mask.long()).logits
    for shards in (2, 4):
        parts = [load_shard(cfg["pretrained_model"], b, f, l, torch.float64) for b, f, l in shard_layout(LAYERS, shards)]
        got = chain(parts, batch.input_ids, batch.token_mask)
        m = batch.token_mask[..., None]
        assert_close(got * m, want * m, FLOAT64_RTOL, f"{arch} S={shards} logits")


def test_split_blocks_is_contiguous_and_balanced():
    assert split_blocks(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert split_blocks(24, 5) == [range(0, 5), range(5, 10), range(10, 15), range(15, 20), range(20, 24)]
    with pytest.raises(ValueError, match="5 shards"):
        split_blocks(4, 5)


def test_more_shards_than_blocks_exits_2_before_any_compute(tmp_path):
    cfg = sharded(build_world(tmp_path, layers=2), 3, "bad")
    path = write_config(tmp_path / "bad.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "ray_influence.cli", "run", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'cluster.shards' is 3 but the model has 2 decoder blocks" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run-bad").exists(), "nothing may be written"
    assert "ray" not in proc.stdout.lower()


def test_a_shard_killed_mid_index_gives_identical_results(tmp_path, ray_local, monkeypatch):
    from ray_influence.worker import CRASH_ONCE_ENV, CRASH_PEER_ONCE_ENV

    cfg = job_config(tmp_path, "llama")
    base = sharded(cfg, 2, "ok")
    run_job(config_from_dict(base), progress=False)
    for env, tag in ((CRASH_PEER_ONCE_ENV, "peer"), (CRASH_ONCE_ENV, "head")):
        flag = tmp_path / f"crashed-{tag}"
        monkeypatch.setenv(env, str(flag))
        other = sharded(cfg, 2, tag)
        summary = run_job(config_from_dict(other), progress=False)
        monkeypatch.delenv(env)
        assert flag.exists(), f"the {tag} shard did not crash"
        assert summary["index"]["docs"] == 20 and summary["index"]["partitions"] == 4
        assert_same_rows(results(other["run_dir"]), results(base["run_dir"]), (3,))
        ia, ib = index_columns(base["run_dir"], "pretrained", 2), index_columns(other["run_dir"], "pretrained", 2)
        assert torch.equal(ia, ib), f"{tag}: the index differs"
