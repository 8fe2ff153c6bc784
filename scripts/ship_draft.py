"""Copy a distilled draft to another directory, its shared-embedding link re-pointed.

A draft stores the path to the model whose input embedding it shares relative to itself
(`embedding_source`), so a plain copy to another depth loses it. This loads the draft, points the
link from DEST to the same model, and writes DEST (atomically) with that model's tokenizer and the
draft's training summary.

    python scripts/ship_draft.py distill/gpu/draft-2l checkpoints/smollm2-draft-2l --overwrite
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

from hsd_jax.io.checkpoint import load_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("dest")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    source, dest = Path(args.source), Path(args.dest)
    draft = load_model(source, layout="stacked")  # checks the link and the embedding's sha256
    shared = (source / draft.config.embedding_source).resolve()
    config = dataclasses.replace(draft.config,
                                 embedding_source=os.path.relpath(shared, dest.resolve()))
    save_model(dest, draft.replace(config=config), tokenizer_source_dir=shared, overwrite=args.overwrite)
    shutil.copyfile(source / "distill_summary.json", dest / "distill_summary.json")
    load_model(dest, layout="stacked")
    print(f"wrote {dest} (embedding from {config.embedding_source})")


if __name__ == "__main__":
    main()
