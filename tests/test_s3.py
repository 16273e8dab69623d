"""Object storage end to end: inputs, models and run_dir on S3 (a local moto server).

The S3 settings travel as the standard AWS environment variables (endpoint, key, secret),
which botocore (under s3fs) reads in every process: the driver, and the Ray workers, which
inherit the environment of the process that started Ray. So they are set before Ray starts.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from conftest import free_port, wait_for_http
from test_token_influence import shared_run
from ray_influence.cli import main
from ray_influence.config import config_from_dict
from ray_influence.data import list_files, plan_partitions, read_partition
from ray_influence.driver import run_job

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "influence"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a subprocess), and the AWS variables pointing at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"{endpoint}/moto-api/", proc, 60, "the moto server")
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                               "AWS_EC2_METADATA_DISABLED": "true",
                               "RAY_INFLUENCE_CACHE": str(tmp_path_factory.mktemp("model-cache"))}.items():
                mp.setenv(key, value)
            mp.delenv("AWS_PROFILE", raising=False)
            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem()
            fs.mkdir(BUCKET)
            yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory, request):
    """The shared run's world uploaded to S3, and the same job with every path on S3."""
    root, local_cfg = shared_run(tmp_path_factory, request)  # may start Ray: after the variables are set
    ray = request.getfixturevalue("ray_local")
    seen = ray.get(ray.remote(lambda: os.environ.get("AWS_ENDPOINT_URL_S3")).remote())
    assert seen == os.environ["AWS_ENDPOINT_URL_S3"], "Ray workers must inherit the S3 endpoint"
    base = f"{BUCKET}/world"
    for name in ("corpus", "models"):
        s3.put(str(root / name), f"{base}/{name}", recursive=True)
    for name in ("finetune.jsonl", "queries.jsonl"):
        s3.put(str(root / name), f"{base}/{name}")
    cfg = copy.deepcopy(local_cfg)
    cfg.update(run_dir=f"s3://{BUCKET}/runs/one", pretrained_model=f"s3://{base}/models/pt",
               finetuned_model=f"s3://{base}/models/ft")
    cfg["corpus"]["path"] = f"s3://{base}/corpus"
    cfg["finetune_data"]["path"] = f"s3://{base}/finetune.jsonl"
    cfg["queries"]["path"] = f"s3://{base}/queries.jsonl"
    summary = run_job(config_from_dict(cfg), progress=False)
    return cfg, local_cfg, summary


def _rows(path: str, filesystem=None) -> list[dict]:
    table = ds.dataset(path, format="parquet", partitioning="hive", filesystem=filesystem).to_table()
    # Ordered by everything but the score, so round-off in a score cannot reorder the rows.
    return sorted(table.to_pylist(), key=lambda r: tuple(str(v) for k, v in r.items() if k != "score"))


def test_corpus_glob_and_directory_on_s3(s3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(2):
        pq.write_table(pa.table({"doc_id": [10 * i, 10 * i + 1], "text": ["a b", "c d"]}), tmp_path / f"p{i}.parquet")
        s3.put(str(tmp_path / f"p{i}.parquet"), f"{BUCKET}/glob/p{i}.parquet")
    for url in (f"s3://{BUCKET}/glob/*.parquet", f"s3://{BUCKET}/glob"):
        files = list_files(url)
        assert [f.url for f in files] == [f"s3://{BUCKET}/glob/p0.parquet", f"s3://{BUCKET}/glob/p1.parquet"]
        assert all(f.fingerprint for f in files)
        docs = [d for p in plan_partitions(files, 1) for d in read_partition(p, "doc_id", "text")[0]]
        assert [d.doc_id for d in docs] == [0, 1, 10, 11]


def test_job_on_s3_matches_the_same_job_on_local_disk(s3, s3_run):
    cfg, local_cfg, summary = s3_run
    assert summary["index"]["partitions"] == summary["index"]["partitions_total"] > 1
    fs = s3fs.S3FileSystem()
    run = cfg["run_dir"].removeprefix("s3://")
    for table in ("results", "token_influence", "layer_influence"):
        remote = _rows(f"{run}/{table}", fs)
        local = _rows(f"{local_cfg['run_dir']}/{table}")
        assert len(remote) == len(local) > 0
        # The same float64 job; Ray may add the workers' partial sums in another order, so
        # scores agree to 1e-9 of the largest |score| of their method and query (not absolutely).
        scale: dict[tuple, float] = {}
        for l in local:
            key = (l["method"], l["query_id"])
            scale[key] = max(scale.get(key, 0.0), abs(l["score"]))
        for r, l in zip(remote, local):
            assert {k: v for k, v in r.items() if k != "score"} == {k: v for k, v in l.items() if k != "score"}
            bound = 1e-9 * max(abs(l["score"]), scale[(l["method"], l["query_id"])])
            assert abs(r["score"] - l["score"]) <= bound, f"{table} {l}: |diff| {abs(r['score'] - l['score']):.3e} > {bound:.3e}"
    for rel in ("run.json", "manifest.json", "skipped.parquet", "queries/queries.parquet"):
        assert fs.exists(f"{run}/{rel}"), rel
    assert not [p for p in fs.find(run) if ".tmp-" in p], "no temporary pieces left behind"


def test_rerun_on_s3_resumes_from_the_run_dir(s3_run):
    cfg, _, first = s3_run
    again = run_job(config_from_dict(cfg), progress=False)
    assert "fit_pretrained" not in again and "fit_finetuned" not in again  # factors found on S3
    assert again["index"]["partitions"] == 0  # every index piece found on S3
    assert again["score"]["queries"] == first["score"]["queries"]


def test_inspect_reads_a_run_on_s3(s3_run, capsys):
    cfg, _, _ = s3_run
    assert main(["inspect", cfg["run_dir"]]) == 0
    out = capsys.readouterr().out
    assert "score" in out and "duplicate_id" in out
