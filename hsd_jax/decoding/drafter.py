"""The one interface every level of a hierarchy implements, neural or not.

A *drafter* is anything that, given the token sequence so far, gives a next-token law at chosen
positions. `models.Model` (dense or int8) and `decoding.ngram.NGramDrafter` both implement it;
`decoding.hsd` and `decoding.ar` use only this interface, never the concrete types.

    vocab_size                  static int
    num_params                  distinct weights (the planner orders levels by it)
    init_state(batch, size)     its decoding state: a KV cache, or None for a stateless drafter
    score(state, seq, ends, window) -> (logits [B, C, V] float32, state)

`score` returns the logits of the token at each position `ends[b, c]` given `seq[b, :ends[b, c]]`.
A model with a cache feeds `window` tokens of `seq` from its cache length on (the catch-up window,
then the queried tokens) in one forward pass and returns its advanced cache; the caller sets the
lengths it keeps. A stateless drafter ignores `state` and `window`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class Drafter(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def num_params(self) -> int: ...

    def init_state(self, batch: int, size: int) -> Any: ...

    def score(self, state: Any, seq: jax.Array, ends: jax.Array, window: int) -> tuple[jax.Array, Any]: ...


def describe(level: Drafter) -> str:
    """A short human name of a level: `ngram(n=3)` or `llama(134.5M)`."""
    name = getattr(level, "describe", None)
    return name() if callable(name) else f"{type(level).__name__}({level.num_params / 1e6:.1f}M)"
