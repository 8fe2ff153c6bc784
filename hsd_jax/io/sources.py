"""Family members named by a *source* string, parsed in this one place.

    DIR        a converted model directory
    int8:DIR   an int8 copy of the model in DIR (made at load time)
    ngram:N    the prompt-lookup n-gram drafter with context n = N (no weights)

`from_source` is the factory the CLI, profile, planner and bench use to build any level.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from hsd_jax.decoding.drafter import Drafter
from hsd_jax.decoding.ngram import MAX_NGRAM, NGramDrafter
from hsd_jax.io.checkpoint import load_model
from hsd_jax.models import quantize_int8

NGRAM_PREFIX = "ngram:"
INT8_PREFIX = "int8:"


@dataclasses.dataclass(frozen=True)
class LevelSource:
    """A parsed source: its kind, and the model directory or the n-gram order."""

    kind: Literal["model", "int8", "ngram"]
    path: str = ""
    n: int = 0

    @property
    def text(self) -> str:
        if self.kind == "ngram":
            return f"{NGRAM_PREFIX}{self.n}"
        return f"{INT8_PREFIX}{self.path}" if self.kind == "int8" else self.path

    @property
    def name(self) -> str:
        """The default short name: ngram3, DIRNAME-int8 or DIRNAME."""
        if self.kind == "ngram":
            return f"ngram{self.n}"
        return f"{Path(self.path).name}-int8" if self.kind == "int8" else Path(self.path).name

    @property
    def is_ngram(self) -> bool:
        return self.kind == "ngram"

    def directory(self, base_dir: str | Path = ".") -> Path | None:
        """The model directory behind the source (relative paths against `base_dir`), or None."""
        return None if self.kind == "ngram" else Path(base_dir) / self.path


def parse_source(text: Any) -> LevelSource:
    """Parse `DIR`, `int8:DIR` or `ngram:N`; a clear ValueError otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a source must be a model directory, int8:DIR or ngram:N; got {text!r}")
    if text.startswith(NGRAM_PREFIX):
        value = text[len(NGRAM_PREFIX):]
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_NGRAM:
            raise ValueError(f"bad source {text!r}: expected ngram:N with an integer N in [1, {MAX_NGRAM}]")
        return LevelSource("ngram", n=n)
    if text.startswith(INT8_PREFIX):
        path = text[len(INT8_PREFIX):]
        if not path:
            raise ValueError(f"bad source {text!r}: expected int8:DIR with a model directory")
        return LevelSource("int8", path=path)
    return LevelSource("model", path=text)


def source_name(text: str) -> str:
    return parse_source(text).name


def from_source(text: str | LevelSource, *, vocab_size: int | None = None, base_dir: str | Path = ".",
                dtype: Any = None) -> Drafter:
    """The level a source names: a `Model` (plain or int8) or an `NGramDrafter`.

    `vocab_size` is the target's, needed for the n-gram drafter; relative directories resolve
    against `base_dir` (a plan's sources resolve against the plan file's directory).
    """
    source = text if isinstance(text, LevelSource) else parse_source(text)
    if source.is_ngram:
        if vocab_size is None:
            raise ValueError(f"{source.text}: the n-gram drafter needs the target's vocab_size")
        return NGramDrafter(source.n, vocab_size)
    model = load_model(source.directory(base_dir), dtype=dtype)
    return quantize_int8(model) if source.kind == "int8" else model
