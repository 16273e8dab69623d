"""The attribution job, for `ray job submit`.

    ray job submit --working-dir . -- python jobs/attribute.py --config CONFIG.yaml

Connects to the cluster with a plain `ray.init()` (the job's address comes from Ray) and
runs every stage the run directory does not already hold (see `ray-influence run`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="path or fsspec URL of the YAML config")
    p.add_argument("--stage", default="all", choices=["all", "fit", "index", "query", "score"],
                   help="one stage only (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    import ray

    from ray_influence.cli import EXIT_BAD_INPUT, USER_ERRORS, print_summary
    from ray_influence.config import load_config
    from ray_influence.driver import run_job, stages_of
    from ray_influence.preflight import preflight

    try:
        cfg = load_config(args.config)
        preflight(cfg, stages_of(args.stage))
        ray.init()
        summary = run_job(cfg, args.stage, progress=not args.no_progress, checked=True)
    except USER_ERRORS as e:
        print(f"attribute.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_summary(summary, cfg.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
