"""Prompt sets shipped with hsd-jax.

* ``instructions.jsonl`` -- the instruction set the target model answers to make
  the distillation corpus for the draft models.
* ``eval_prompts.jsonl`` -- held-out evaluation prompts for profiling and benchmarks;
  none of them (nor a near-duplicate) appears in the instruction set.

Both files hold one JSON object per line: ``{"prompt": "...", "category": "..."}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "CATEGORIES",
    "eval_prompts_path",
    "instructions_path",
    "load_prompts",
    "load_records",
    "pad_prompts",
]

_DIR = Path(__file__).resolve().parent / "data"

CATEGORIES = ("code", "explanation", "stories", "lists", "math", "writing", "chat")


def instructions_path() -> Path:
    """Path of the training instruction set (JSONL)."""
    return _DIR / "instructions.jsonl"


def eval_prompts_path() -> Path:
    """Path of the held-out evaluation prompts (JSONL)."""
    return _DIR / "eval_prompts.jsonl"


def load_records(path: str | Path) -> list[dict]:
    """Every record of a JSONL prompt file, in order; blank lines are skipped.

    Raises ValueError naming the file and the 1-based line number when a line is not
    valid JSON, is not a JSON object, or has a missing, non-string or empty "prompt".
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            prompt = rec.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                what = "missing" if "prompt" not in rec else "empty or not a string"
                raise ValueError(f'{path}:{lineno}: "prompt" field is {what}')
            records.append(rec)
    return records


def load_prompts(path: str | Path) -> list[str]:
    """The "prompt" field of every line of a JSONL file (see `load_records` for errors)."""
    return [rec["prompt"] for rec in load_records(path)]


PROMPT_BUCKET = 16


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0,
                bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Token-id prompts as one int32 batch [N, W] (W rounded up to `bucket`, so that nearby widths
    share one compiled program) and their lengths [N]."""
    if not prompts:
        raise ValueError("no prompts to pad: the prompt list is empty")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise ValueError("a prompt has no tokens; every prompt needs at least one")
    width = -(-int(lengths.max()) // bucket) * bucket
    out = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out, lengths
