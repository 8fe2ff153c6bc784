"""`hsd-jax` command line: the parser of every subcommand and the one error handler.

Each subcommand is a module of this package with `add_parser(subparsers)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hsd_jax.cli import bench, convert, distill, export, generate, plan, profile, validate

# In the order `hsd-jax --help` lists them.
COMMANDS = (convert, generate, distill, profile, plan, export, validate, bench)
# The errors a command reports as `hsd-jax <command>: error: ...` (exit status 2).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsd-jax", description="Hierarchical speculative decoding in JAX")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        before = set(subparsers.choices)
        module.add_parser(subparsers)
        for name in subparsers.choices.keys() - before:
            subparsers.choices[name].set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"hsd-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
