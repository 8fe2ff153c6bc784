"""Argument helpers shared by the `hsd-jax` subcommands: integer lists, sampling flags, `--mesh`."""

from __future__ import annotations

import argparse
from typing import Any

from hsd_jax.parallel import distributed
from hsd_jax.parallel.sharding import parse_mesh, parse_mesh_spec


def int_list(text: str) -> list[int]:
    """'4,8' -> [4, 8] (an argparse type)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_sampling(parser: argparse.ArgumentParser) -> None:
    """`--max-new-tokens --temperature --top-k --top-p --seed`."""
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def mesh_spec(text: str) -> str:
    """An argparse type: `text` if it is a valid mesh spec (syntax only, no device touched)."""
    try:
        parse_mesh_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--mesh data=D,model=M`. It is only syntax-checked while parsing (before any device is
    touched, so `distributed.initialize` can still run); build it with `mesh_from_args(args)`."""
    parser.add_argument("--mesh", type=mesh_spec, default=None, metavar="data=D,model=M",
                        help="shard the models over a device mesh: D-way data parallel (batch rows) x M-way "
                             "tensor parallel (heads, MLP, vocabulary); omitted axes are 1, one may be -1 "
                             "(the remaining devices). Default: one device")


def mesh_from_args(args: argparse.Namespace) -> Any:
    """The `--mesh` of a command (None without one), after multi-process start-up."""
    if not getattr(args, "mesh", None):
        return None
    distributed.initialize()
    return parse_mesh(args.mesh)


def progress_printer(message: str) -> None:
    """The progress callback the commands hand to long-running library functions."""
    print(message, flush=True)


DTYPE_CHOICES = ("float32", "bfloat16")


def add_dtype_argument(parser: argparse.ArgumentParser, default_help: str = "as stored") -> None:
    """--dtype: the weight dtype to run every model in (float32 accumulation either way)."""
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help=f"weight dtype to run in (default: {default_help}); bfloat16 halves the "
                             "bytes read and flattens a k-token verification on CPU")
