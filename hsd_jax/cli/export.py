"""`hsd-jax export-hf DIR OUT`: an hsd-jax model as a Hugging Face (transformers) model."""

from __future__ import annotations

import argparse

from hsd_jax.io.export import EXPORT_DTYPES, export_hf


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `export-hf DIR OUT [--dtype float32|bfloat16] [--overwrite]` subcommand."""
    p = subparsers.add_parser("export-hf", help="write an hsd-jax model directory as a Hugging Face model")
    p.add_argument("model_dir", metavar="DIR", help="hsd-jax model directory")
    p.add_argument("out_dir", metavar="OUT", help="Hugging Face model directory to write")
    p.add_argument("--dtype", default="float32", choices=list(EXPORT_DTYPES))
    p.add_argument("--overwrite", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    out = export_hf(args.model_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
