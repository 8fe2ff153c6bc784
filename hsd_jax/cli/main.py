"""`hsd-jax` command line: the parser of every subcommand and the one error handler.

Each subcommand is a module of this package with `add_parser(subparsers)` and `run(args) -> int`.
Every expected failure ends as one line `hsd-jax <command>: error: <problem and fix>` on stderr
and exit status 2; Ctrl-C (or SIGTERM) as `hsd-jax <command>: interrupted` and status 130 (143),
after the atomic writers have removed their temporary files. Anything else is a bug: one line
naming it (the traceback with HSD_JAX_TRACEBACK=1) and status 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Sequence

from hsd_jax.cli import bench, convert, distill, export, generate, make_data, plan, profile, validate

# In the order `hsd-jax --help` lists them.
COMMANDS = (convert, generate, make_data, distill, profile, plan, export, validate, bench)
# The errors a command reports as `hsd-jax <command>: error: ...` (exit status 2). ValueError
# includes UnicodeError and the library's UnsupportedArchitectureError; OSError the file errors.
USER_ERRORS = (ValueError, TypeError, KeyError, OSError)
INTERRUPTED, TERMINATED = 130, 143


class _Signals:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt in the main thread and are remembered, so an
    interrupt swallowed by a callback (a JAX gc hook once did) still ends the run as interrupted."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def handler(self, signum, frame) -> None:
        first = self.received is None
        self.received = signum
        if first:
            raise KeyboardInterrupt

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[signum] = signal.signal(signum, self.handler)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def status(self) -> int:
        return TERMINATED if self.received == signal.SIGTERM else INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsd-jax", description="Hierarchical speculative decoding in JAX")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        before = set(subparsers.choices)
        module.add_parser(subparsers)
        for name in subparsers.choices.keys() - before:
            subparsers.choices[name].set_defaults(run=module.run)
    return parser


def _message(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError):
        return f"missing key {text}"
    if isinstance(err, OSError) and err.filename is not None and text.startswith("["):
        return f"{err.strerror}: {err.filename}"
    return " ".join(text.split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signals = _Signals()
    signals.install()
    prefix = f"hsd-jax {args.command}:"
    try:
        status = args.run(args)
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return signals.status()
    except USER_ERRORS as err:
        print(f"{prefix} error: {_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("HSD_JAX_TRACEBACK"):
            traceback.print_exc()
        print(f"{prefix} internal error: {type(err).__name__}: {_message(err)} (please report it; "
              "HSD_JAX_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        signals.restore()
    if signals.received is not None:
        print(f"{prefix} interrupted", file=sys.stderr)
        return signals.status()
    return status


if __name__ == "__main__":
    sys.exit(main())
