"""The attribution job, for `ray job submit`.

    ray job submit --working-dir . -- python jobs/attribute.py --config CONFIG.yaml

Connects to the cluster with a plain `ray.init()` (the job's address comes from Ray) and
runs every stage the run directory does not already hold. It is `ray-influence run`
(:func:`ray_influence.cli.main`) under the flags a job script is called with.
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
    p.add_argument("--summary-json", default=None, help="also write the final summary as JSON to this local file")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from ray_influence.cli import main as cli_main

    argv = ["run", args.config, "--stage", args.stage]
    argv += ["--no-progress"] if args.no_progress else []
    argv += ["--summary-json", args.summary_json] if args.summary_json else []
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
