"""Distil a draft for a target: `python scripts/distill.py --target DIR --out-dir DIR --layers 0,29`.

The same as `hsd-jax distill`; see `hsd-jax distill --help` and checkpoints/*/README.md for the
commands that made the shipped drafts.
"""

import sys

from hsd_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
