"""Incremental detokenization: text as tokens arrive, never a multi-byte character cut in half.

Byte-level tokenizers split one character (an emoji, a CJK character, an accented letter) over
several tokens; decoding a prefix that ends inside it gives U+FFFD. `TextStream` decodes the whole
generated prefix each time, holds back a trailing U+FFFD until the rest of the character arrives,
and hands out only the new stable suffix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """`push(tokens)` returns the new printable text; `flush()` the rest at the end."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.printed = ""

    def _emit(self, text: str) -> str:
        if text.startswith(self.printed):
            new = text[len(self.printed):]
        else:  # decoding changed earlier text (rare: whitespace clean-up); never re-print it
            common = 0
            while common < min(len(text), len(self.printed)) and text[common] == self.printed[common]:
                common += 1
            new = text[max(common, len(self.printed)):]
        self.printed += new
        return new

    def push(self, tokens: Iterable[int]) -> str:
        self.tokens.extend(int(t) for t in tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
        return self._emit(text.rstrip(REPLACEMENT))

    def flush(self) -> str:
        """The held-back tail (a character the generation really left unfinished stays U+FFFD)."""
        return self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens))
