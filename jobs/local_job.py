"""One attribution job on a fresh local Ray instance, timed (shared by the benchmarks)."""

from __future__ import annotations

import time


def run_local(cfg: dict, cpus: float) -> tuple[dict, float]:
    """Runs the job of config dict ``cfg`` on a local Ray of ``cpus`` CPUs (started and shut down here).

    Returns:
        ``(the job's summary, wall seconds of run_job)``.
    """
    import ray

    from ray_influence.config import config_from_dict
    from ray_influence.driver import run_job

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        summary = run_job(config_from_dict(cfg), progress=False)
        return summary, time.perf_counter() - t0
    finally:
        ray.shutdown()
