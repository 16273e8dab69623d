"""``ray-influence`` command line: ``run``, ``demo``.

Exit codes: 0 success; 2 invalid config or input (one message on stderr, nothing
written); 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ray-influence", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a small end-to-end example on a toy world it builds itself")
    demo.add_argument("--workdir", default=None, help="where models and results go (default: a temp dir)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the toy world and the models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "demo":
            from .example import run_example

            if args.workdir:
                run_example(args.workdir, args.seed)
            else:
                with tempfile.TemporaryDirectory(prefix="ray-influence-demo-") as d:
                    run_example(d, args.seed)
        return EXIT_OK
    except ValueError as e:  # user-caused errors are ValueErrors with the bad value named
        print(f"ray-influence: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
