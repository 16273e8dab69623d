"""The job on real (in-process) Ray: results, invariances, resume, growth, new queries."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import torch

from precision import assert_close
from world import build_world, corpus_rows, write_config, write_corpus_file
from ray_influence import attribution
from ray_influence.config import config_from_dict
from ray_influence.driver import run_job
from ray_influence.ekfac import ihvp
from ray_influence.factors_io import factors_from_bytes
from ray_influence.models import load_model, load_tokenizer
from ray_influence.modules import find_tracked_modules
from ray_influence.rundir import RunDir
from ray_influence.scoring import Method, top_k
from ray_influence.store import factors_rel
from ray_influence.tokens import tokenize_document, tokenize_prompt_completion

# Float64 end to end: distributed sums vs one process, batched differently. The world's
# GPT-NeoX has one float32 step, its rotary angles: a table of positions, the same in every
# batch, so both sides are float64 throughout otherwise (round-off ~1e-15 relative). The
# bounds are relative to the magnitude of the compared values (top-k scores; an iHVP vector
# as a whole, since its elements near 0 carry the round-off of the large ones).
SCORE_RTOL = 1e-8
FACTOR_RTOL = 1e-9


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("world")
    cfg = build_world(root)
    summary = run_job(config_from_dict(cfg), progress=False)
    return root, cfg, summary


def results(run_dir: str) -> list[tuple]:
    q = (f"select method, query_id, rank, doc_id, score, doc_text from read_parquet('{run_dir}/results/**/*.parquet', "
         "hive_partitioning=true) order by method, query_id, rank")
    return duckdb.sql(q).fetchall()


def assert_same_scores(got: list[tuple], want: list[tuple]) -> None:
    """Result rows (method, query_id, rank, doc_id, score, ...): scores within SCORE_RTOL of
    the largest |score| of their method and query (a score near 0 carries the others' round-off)."""
    scale: dict[tuple, float] = {}
    for w in want:
        scale[w[:2]] = max(scale.get(w[:2], 0.0), abs(w[4]))
    for g, w in zip(got, want):
        bound = SCORE_RTOL * max(abs(w[4]), scale[w[:2]])
        assert abs(g[4] - w[4]) <= bound, f"{w[:4]}: score {g[4]!r} vs {w[4]!r}, |diff| {abs(g[4] - w[4]):.3e} > {bound:.3e}"


def with_(cfg: dict, **changes) -> dict:
    out = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        d = out
        *head, last = dotted.split("__")
        for h in head:
            d = d[h]
        d[last] = value
    return out


def reference(cfg: dict) -> dict[str, list[tuple]]:
    """The same computation with the library in this process: {method: [(query, rank, doc_id, score)]}."""
    import json as _json

    import pyarrow.parquet as pq

    pt = load_model(cfg["pretrained_model"], "float64")
    ft = load_model(cfg["finetuned_model"], "float64")
    tok = load_tokenizer(cfg["pretrained_model"])
    rows = pq.read_table(Path(cfg["corpus"]["path"]) / "part-0.parquet").to_pylist()
    docs = [tokenize_document(tok, str(r["doc_id"]), r["text"], cfg["corpus"]["max_length"]) for r in rows]
    ft_rows = [_json.loads(line) for line in Path(cfg["finetune_data"]["path"]).read_text().splitlines()]
    ft_ex = [tokenize_prompt_completion(tok, f"ft{i}", r["prompt"], r["completion"], 512, True) for i, r in enumerate(ft_rows)]
    q_rows = [_json.loads(line) for line in Path(cfg["queries"]["path"]).read_text().splitlines()]
    q_ex = [tokenize_prompt_completion(tok, r["query_id"], r["prompt"], r["completion"], 512, False) for r in q_rows]
    specs = find_tracked_modules(pt)
    names = list(specs)
    e = cfg["ekfac"]
    f_pt = attribution.fit_factors(pt, docs, specs, "true", e["fisher_samples"], e["seed"])
    f_ft = attribution.fit_factors(ft, ft_ex, specs, "true", e["fisher_samples"], e["seed"])
    d_pt = attribution.document_gradients(pt, docs, specs).grads
    d_ft = attribution.document_gradients(ft, docs, specs).grads
    g_q = attribution.document_gradients(ft, q_ex, specs).grads
    out = {}
    for m in cfg["scoring"]["methods"]:
        method = Method.parse(m)
        d = d_ft if method.doc_model == "finetuned" else d_pt
        s = attribution.influence_scores(method, g_q, d, names, f_ft, f_pt)
        values, idx = top_k(s, cfg["scoring"]["top_k"])
        out[m] = [(r["query_id"], rank + 1, rows[int(idx[qi, rank])]["doc_id"], float(values[qi, rank]))
                  for qi, r in enumerate(q_rows) for rank in range(values.shape[1])]
    return out


def test_results_schema_and_exact_scores(world):
    root, cfg, summary = world
    schema = duckdb.sql(f"describe select * from read_parquet('{cfg['run_dir']}/results/**/*.parquet', "
                        "hive_partitioning=true)").fetchall()
    types = {name: t for name, t, *_ in schema}
    assert types == {"query_id": "VARCHAR", "rank": "INTEGER", "doc_id": "BIGINT", "score": "DOUBLE",
                     "doc_text": "VARCHAR", "method": "VARCHAR"}, types
    got = results(cfg["run_dir"])
    want = reference(cfg)
    for method, rows in want.items():
        mine = [(q, r, d, s) for m, q, r, d, s, _ in got if m == method]
        assert [x[:3] for x in mine] == [x[:3] for x in rows], f"{method}: top-k differs"
        assert_same_scores([(method, *x) for x in mine], [(method, *x) for x in rows])
    meta = duckdb.sql(f"select value from parquet_kv_metadata('{cfg['run_dir']}/results/method=multi_stage/part-0.parquet') "
                      "where key = 'ray_influence'").fetchall()[0][0]
    meta = json.loads(meta)
    assert meta["pretrained_model"] == cfg["pretrained_model"] and "torch" in meta["versions"]
    assert meta["config"]["projection"]["dim"] == 0


def factors_action(run_dir: str, stage: str) -> dict[str, torch.Tensor]:
    """The iHVP of a fixed vector per module (invariant to eigenvector signs and order)."""
    factors, _ = factors_from_bytes(RunDir(run_dir).read_piece(factors_rel(stage, 0)))
    gen = torch.Generator().manual_seed(0)
    return {n: ihvp(torch.randn(f.shape, generator=gen, dtype=torch.float64), f) for n, f in factors.items()}


def test_replicas_and_partitions_do_not_change_the_result(world, tmp_path):
    root, cfg, _ = world
    other = with_(cfg, run_dir=str(tmp_path / "run1"), corpus__partition_docs=20, cluster__replicas=1)
    run_job(config_from_dict(other), progress=False)
    for stage in ("pretrained", "finetuned"):
        a, b = factors_action(cfg["run_dir"], stage), factors_action(other["run_dir"], stage)
        for n in a:
            assert_close(b[n], a[n], FACTOR_RTOL, f"{stage} {n}: iHVP of a fixed vector")
    ra, rb = results(cfg["run_dir"]), results(other["run_dir"])
    assert [r[:4] for r in ra] == [r[:4] for r in rb]
    assert_same_scores(rb, ra)


def markers(run_dir: str, stage: str = "pretrained") -> dict[str, tuple[str, float]]:
    d = Path(run_dir) / "index" / stage / "shard-0"
    return {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in sorted(d.glob("*.safetensors.json"))}


def test_new_corpus_file_indexes_only_new_partitions(world, tmp_path):
    root, cfg, _ = world
    grown = with_(cfg, run_dir=str(tmp_path / "run"), corpus__path=str(tmp_path / "corpus"))
    write_corpus_file(tmp_path / "corpus" / "a.parquet", corpus_rows(12, seed=5))
    run_job(config_from_dict(grown), progress=False)
    before = markers(grown["run_dir"])
    write_corpus_file(tmp_path / "corpus" / "b.parquet", corpus_rows(7, seed=6, start_id=100))
    summary = run_job(config_from_dict(grown), progress=False)
    after = markers(grown["run_dir"])
    assert summary["index"]["partitions"] == 2, "only b.parquet's 2 partitions (7 docs / 6) are new"
    assert {k: v for k, v in after.items() if k in before} == before, "old partitions were rewritten"
    assert len(after) == len(before) + 2
    manifest = RunDir(grown["run_dir"]).read_json("manifest.json")
    assert len(manifest["index"]["pretrained"]) == 4
    doc_ids = {r[3] for r in results(grown["run_dir"])}
    assert doc_ids <= set(range(12)) | set(range(100, 107))


def test_new_queries_reuse_factors_and_index(world, tmp_path):
    root, cfg, _ = world
    run = RunDir(cfg["run_dir"])
    factors_before = run.read_json(factors_rel("pretrained", 0) + ".json")
    index_before = markers(cfg["run_dir"])
    qpath = tmp_path / "queries2.jsonl"
    qpath.write_text(json.dumps({"query_id": "new", "prompt": "the red cat", "completion": " runs in"}) + "\n")
    changed = with_(cfg, queries__path=str(qpath))
    summary = run_job(config_from_dict(changed), progress=False)
    assert "fit_pretrained" not in summary and summary["index"]["partitions"] == 0
    assert run.read_json(factors_rel("pretrained", 0) + ".json") == factors_before
    assert markers(cfg["run_dir"]) == index_before
    assert {r[1] for r in results(cfg["run_dir"])} == {"new"}
    run_job(config_from_dict(cfg), progress=False)  # put the module's world back


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie runs nothing
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def wait_for_other_jobs_actors_to_exit(ray, timeout_s: float) -> None:
    """Waits until every actor process of a job other than this test's has exited.

    A wait on a state, not a sleep: it returns as soon as the processes are gone and fails
    naming them if they outlive ``timeout_s``.
    """
    from ray._private.state import actors  # the GCS actor table: job and process of each actor

    mine = ray.get_runtime_context().get_job_id()
    pids = {a["Pid"] for a in actors().values() if a.get("JobID") != mine and a.get("Pid")}
    assert pids, "the GCS lists no actor of another job: the killed driver's workers cannot be awaited"
    deadline = time.monotonic() + timeout_s
    while pids := {p for p in pids if not _process_gone(p)}:
        assert time.monotonic() < deadline, f"actor processes {sorted(pids)} of the killed driver still run"
        time.sleep(0.05)


def test_killed_driver_resumes_with_identical_results(world, tmp_path, ray_local):
    root, cfg, _ = world
    resumed = with_(cfg, run_dir=str(tmp_path / "run"), corpus__partition_docs=2)
    config_path = write_config(tmp_path / "cfg.yaml", resumed)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "RAY_INFLUENCE_TEST_INDEX_DELAY_S": "1.0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "ray_influence.cli", "run", str(config_path), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and len(markers(resumed["run_dir"])) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The killed driver's actors die after it, when Ray notices: until their processes are
    # gone they may still write a piece. Read what was done only once they cannot.
    wait_for_other_jobs_actors_to_exit(ray_local, timeout_s=120)
    done_before = markers(resumed["run_dir"])
    assert 3 <= len(done_before) < 10, f"kill landed outside the index stage ({len(done_before)} of 10 done)"
    assert not (Path(resumed["run_dir"]) / "results").exists()
    env.pop("RAY_INFLUENCE_TEST_INDEX_DELAY_S")
    rerun = subprocess.run([sys.executable, "-m", "ray_influence.cli", "run", str(config_path), "--no-progress",
                            "--summary-json", str(tmp_path / "summary.json")], env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    after = markers(resumed["run_dir"])
    assert summary["index"]["partitions"] == 10 - len(done_before)
    assert {k: after[k] for k in done_before} == done_before, "completed partitions were recomputed"
    got, want = results(resumed["run_dir"]), results(cfg["run_dir"])
    assert len(got) == len(set((r[0], r[1], r[2]) for r in got)), "duplicate result rows"
    assert [r[:4] for r in got] == [r[:4] for r in want]
    assert_same_scores(got, want)


def test_typo_in_config_exits_2_and_writes_nothing(tmp_path, world):
    root, cfg, _ = world
    bad = with_(cfg, run_dir=str(tmp_path / "never"))
    bad["ekfac"]["fisher_smaples"] = 4
    path = write_config(tmp_path / "bad.yaml", bad)
    proc = subprocess.run([sys.executable, "-m", "ray_influence.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "ekfac.fisher_smaples" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
