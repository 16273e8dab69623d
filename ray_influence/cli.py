"""``ray-influence`` command line: ``run``, ``demo``, ``inspect``, ``report``, ``config-help``.

Exit codes: 0 success; 2 invalid config or input (one message on stderr, nothing
written); 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from .config import ConfigError
from .data import InputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
USER_ERRORS = (ConfigError, InputError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ray-influence", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the attribution job (or one stage) described by a YAML config")
    run.add_argument("config", help="path or fsspec URL of the YAML config")
    run.add_argument("--stage", default="all", choices=["all", "fit", "index", "query", "score"],
                     help="run one stage only (default: all, skipping what the run dir already holds)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars or stage logs on stderr")
    run.add_argument("--summary-json", default=None, help="also write the final summary as JSON to this local file")
    demo = sub.add_parser("demo", help="a small end-to-end example on a toy world it builds itself")
    demo.add_argument("--workdir", default="runs/demo", help="where the world, models and results go (models are reused)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the toy world and the models")
    sub.add_parser("config-help", help="every config key with its default and meaning")
    insp = sub.add_parser("inspect", help="what a run directory holds: stages done, counts, skipped documents, timings")
    insp.add_argument("run_dir", help="the run directory (local path or fsspec URL)")
    insp.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    rep_ = sub.add_parser("report", help="one self-contained HTML page of a run's results and per-token influence")
    rep_.add_argument("run_dir", help="the run directory (local path or fsspec URL)")
    rep_.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/report.html)")
    rep_.add_argument("--docs", type=int, default=10, help="top documents shown per query and method (default: 10)")
    return parser.parse_args(argv)


def init_ray():
    """Connects to the cluster (RAY_ADDRESS or a local `ray start`), or starts a local one.

    Returns:
        Ray's context (``dashboard_url`` among others), or None if Ray was already up.
    """
    import ray

    if ray.is_initialized():
        return None
    if os.environ.get("RAY_ADDRESS"):
        return ray.init()
    # A local instance of our own binds its dashboard to loopback only.
    return ray.init(dashboard_host="127.0.0.1")


def print_summary(summary: dict, run_dir: str) -> None:
    """Stage timings and counts, and where the results are."""
    print("\nsummary")
    for stage, seconds in summary.get("timings", {}).items():
        details = {k: v for k, v in summary.items() if k == stage or k.startswith(stage + "_")}
        print(f"  {stage:<6} {seconds:8.1f}s  {json.dumps(details, default=str)}")
    skipped = summary.get("query", {}).get("skipped")
    if skipped:
        reasons = ", ".join(f"{r}: {n}" for r, n in summary["query"]["skipped_by_reason"].items())
        print(f"\nskipped queries: {skipped} ({reasons}), listed in {run_dir}/skipped_queries.parquet")
    if "score" in summary:
        print(f"\nresults: {run_dir}/results/  (hive-partitioned by method)")
        print(f"  duckdb -c \"select * from read_parquet('{run_dir}/results/**/*.parquet', hive_partitioning=true) "
              "order by query_id, rank limit 20\"")
    if "tokens" in summary:
        print(f"per-token influence: {run_dir}/token_influence/, per module: {run_dir}/layer_influence/")
    if "score" in summary:
        print(f"  ray-influence inspect {run_dir}    ray-influence report {run_dir}")


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .driver import run_job, stages_of
    from .preflight import preflight

    cfg = load_config(args.config)
    preflight(cfg, stages_of(args.stage, cfg.scoring.scoring_mode))  # bad input fails here, before Ray starts or anything is written
    init_ray()
    summary = run_job(cfg, args.stage, progress=not args.no_progress, checked=True)
    if not args.no_progress:
        print_summary(summary, cfg.run_dir)
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(summary, fh, indent=1, default=str)
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import describe_run, format_run

    info = describe_run(args.run_dir)
    print(json.dumps(info, indent=1, default=str) if args.json else format_run(info))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    if args.docs <= 0:
        raise InputError(f"--docs must be positive, got {args.docs!r}")
    print(write_report(args.run_dir, args.out, args.docs))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .example import run_example

    run_example(args.workdir, args.seed)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "config-help":
            from .config import describe

            print(describe())
            return EXIT_OK
    except USER_ERRORS as e:
        print(f"ray-influence: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - the CLI's contract is exit code 1 for anything else
        traceback.print_exc()
        return EXIT_FAILURE
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
