"""The cluster path: a real `ray start --head`, then `ray job submit` of jobs/attribute.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import pytest

from conftest import free_port, wait_for_http
from world import build_world, write_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture()
def head_node():
    """`ray start --head --block` on loopback; stopped by signalling the PID we started."""
    gcs, dash, agent = free_port(), free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}",
         "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{dash}"
    wait_for_http(f"{url}/api/version", proc, 120, "the ray head")
    # `ray job submit` needs the head node's job agent, which comes up after the dashboard
    # (the dashboard then waits only 10 s for it): wait for the agent itself. It registers
    # its address right after its HTTP server answers.
    wait_for_http(f"http://127.0.0.1:{agent}/api/healthz", proc, 120, "the ray dashboard agent")
    try:
        yield url, env
    finally:
        proc.send_signal(signal.SIGTERM)  # --block stops every process it started on exit
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_ray_job_submit_writes_results(head_node, tmp_path):
    url, env = head_node
    cfg = build_world(tmp_path)
    cfg["projection"] = {"dim": 4, "seed": 0, "dtype": "float32"}
    cfg["scoring"]["methods"] = ["multi_stage", "grad_cos"]
    config = write_config(tmp_path / "job.yaml", cfg)
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
         "python", "jobs/attribute.py", "--config", str(config), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout.lower(), proc.stdout[-3000:]
    rows = duckdb.sql(f"select method, count(*) from read_parquet('{cfg['run_dir']}/results/**/*.parquet', "
                      "hive_partitioning=true) group by method order by method").fetchall()
    assert rows == [("grad_cos", 15), ("multi_stage", 15)], rows  # 3 queries x top 5


def test_local_ray_of_the_cli_binds_its_dashboard_to_loopback():
    code = ("import ray\nfrom ray_influence.cli import init_ray\nctx = init_ray()\n"
            "print('URL', ctx.dashboard_url)\nray.shutdown()\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    urls = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("URL ")]
    assert urls and urls[0].startswith("127.0.0.1:"), proc.stdout + proc.stderr[-2000:]
