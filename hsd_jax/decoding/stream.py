"""Streaming: the tokens each row commits, chunk by chunk, from the same rounds as the one-shot program.

The one-shot programs (`hsd_generate`, `ar_generate`) are prefill + one `while_loop` of target
rounds (AR: steps). A stream is prefill (`hsd_start` / `ar_start`, one jitted call) followed by
repeated jitted "continue" calls (`hsd_continue` / `ar_continue`) that carry the whole decoding
state (caches, buffers, counts, key, output buffer) and run at most R more rounds each. The
rounds, and the random keys they draw, are the same ones, so the concatenated chunks are
token-identical to the one-shot output under the same key, greedy or sampled.

The state is donated to each continue call (its caches are updated in place), R is a traced
argument, and every call has the same shapes: nothing recompiles between chunks or between R's.
The next call is dispatched before the host reads the previous chunk, so the device does not wait
for Python while a chunk is printed.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.decoding.ar import GenerationOutput, ar_continue, ar_start, prepare_ar
from hsd_jax.decoding.hsd import (
    Hierarchy,
    ar_stats,
    hsd_continue,
    hsd_output,
    hsd_start,
    prepare_hsd,
)
from hsd_jax.models import Model

Chunk = list[np.ndarray]


class Streamer:
    """A prepared stream for one request: `iter(streamer)` yields chunks; `warm_up()` compiles.

    Each chunk is a list of B one-dimensional int32 numpy arrays: row b's tokens committed since the
    previous chunk (empty for a row that committed nothing, e.g. one already finished). Row b's
    chunks concatenated are `tokens[b, :num_tokens[b]]` of `hsd_generate` / `ar_generate`.
    Every chunk holds at least one token. The first chunk comes as early as possible (HSD: after
    prefill and one target round; AR: after prefill and the first token), the following ones every
    `rounds_per_chunk` target rounds (AR: steps). After the last chunk, `output` holds the final
    `GenerationOutput` (a hierarchy's `stats` included).
    """

    def __init__(self, source: Hierarchy | Model, prompt_tokens, prompt_lengths, key: jax.Array, *,
                 max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | None = None, cache_size: int | None = None, rounds_per_chunk: int = 8):
        if isinstance(rounds_per_chunk, bool) or not isinstance(rounds_per_chunk, int) \
                or rounds_per_chunk < 1:
            raise ValueError(f"rounds_per_chunk must be a positive integer, got {rounds_per_chunk!r}")
        if isinstance(source, Hierarchy) and source.depth == 0:
            source = source.target
        if not isinstance(source, (Hierarchy, Model)):
            raise TypeError(f"expected an hsd_jax.Hierarchy or Model, got {type(source).__name__}")
        request = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=eos_token_id, cache_size=cache_size)
        self.is_ar = isinstance(source, Model)
        prepare = prepare_ar if self.is_ar else prepare_hsd
        self.static = prepare(source, prompt_tokens, prompt_lengths, **request)
        self.source = source
        self.args = (jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32), key)
        self.rounds_per_chunk = rounds_per_chunk
        self.output: GenerationOutput | None = None

    def _start(self):
        return (ar_start if self.is_ar else hsd_start)(self.source, *self.args, **self.static)

    def _continue(self, state, limit: int):
        call = ar_continue if self.is_ar else hsd_continue
        return call(self.source, state, jnp.int32(limit), sampling=self.static["sampling"],
                    eos_token_id=self.static["eos_token_id"])

    def warm_up(self) -> None:
        """Compile the start and continue programs (prefill runs once; no round does)."""
        state, _ = self._start()
        jax.block_until_ready(self._continue(state, 0))

    def compiled_programs(self) -> int:
        """How many programs the start and continue functions hold compiled (tests: no recompilation)."""
        if self.is_ar:
            return ar_start._cache_size() + ar_continue._cache_size()
        return hsd_start._cache_size() + hsd_continue._cache_size()

    def __iter__(self) -> Iterator[Chunk]:
        state, view = self._start()
        # AR commits its first token in prefill; HSD's first chunk is one round, for an early first token
        limit = self.rounds_per_chunk if self.is_ar else 1
        emitted = None
        while True:
            state, next_view = self._continue(state, limit)  # dispatched before `view` is read
            tokens, num_tokens, done = (np.asarray(a) for a in view)
            if emitted is None:
                emitted = np.zeros_like(num_tokens)
            if (num_tokens > emitted).any():
                yield [tokens[b, emitted[b]:num_tokens[b]].copy() for b in range(tokens.shape[0])]
            emitted = num_tokens
            if done.all():
                break
            view, limit = next_view, self.rounds_per_chunk
        self.output = self._final(state)

    def _final(self, state) -> GenerationOutput:
        if self.is_ar:
            return GenerationOutput(tokens=state.out.tokens, num_tokens=state.out.num_tokens,
                                    stats=ar_stats(state.out.num_tokens))
        return hsd_output(state)


def stream(source: Hierarchy | Model, prompt_tokens, prompt_lengths, key: jax.Array, *, max_new_tokens: int,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
           cache_size: int | None = None, rounds_per_chunk: int = 8) -> Iterator[Chunk]:
    """Generate like `hsd_generate` (a Hierarchy) or `ar_generate` (a Model), yielding each row's
    newly committed tokens as they come: a list of B int32 arrays per chunk (see `Streamer`).
    The generator's return value (`StopIteration.value`, or `x = yield from stream(...)`) is the
    final `GenerationOutput`."""
    streamer = Streamer(source, prompt_tokens, prompt_lengths, key, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                        cache_size=cache_size, rounds_per_chunk=rounds_per_chunk)
    yield from streamer
    return streamer.output


__all__ = ["Chunk", "Streamer", "stream"]
