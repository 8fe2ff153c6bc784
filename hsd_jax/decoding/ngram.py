"""Prompt-lookup n-gram drafter: a model with no weights whose next-token law is one-hot.

It predicts the token at position e by finding the most recent earlier occurrence of the
context's last k tokens (k = n, n-1, ..., 1) and copying the token that followed it. With no
match at all it repeats the last token. Because q is one-hot, it is a valid drafter at any level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

MAX_NGRAM = 16  # its lookup unrolls n * (n + 1) / 2 comparisons: larger n compiles for minutes


@struct.dataclass
class NGramDrafter:
    n: int = struct.field(pytree_node=False)
    vocab_size: int = struct.field(pytree_node=False)

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_NGRAM:
            raise ValueError(f"the n-gram drafter needs an integer n in [1, {MAX_NGRAM}], got {self.n!r}")

    @property
    def num_params(self) -> int:
        return 0

    def predict(self, seq: jax.Array, ends: jax.Array) -> jax.Array:
        """The predicted token at each position `ends[b, c]`, given `seq[b, :ends[b, c]]`."""
        batch, size = seq.shape
        positions = jnp.arange(size)
        rows = jnp.arange(batch)[:, None]
        prediction = jnp.take_along_axis(seq, jnp.clip(ends - 1, 0, size - 1), axis=1)  # fallback
        found = jnp.zeros(ends.shape, bool)
        for k in range(self.n, 0, -1):
            match = (positions >= k)[None, None, :] & (positions[None, None, :] < ends[..., None])
            for d in range(k):
                earlier = seq[:, jnp.clip(positions - k + d, 0, size - 1)]  # [B, S]
                suffix = seq[rows, jnp.clip(ends - k + d, 0, size - 1)]  # [B, C]
                match &= earlier[:, None, :] == suffix[..., None]
            match &= (ends >= k)[..., None]
            latest = jnp.max(jnp.where(match, positions, -1), axis=-1)
            use = ~found & (latest >= 0)
            prediction = jnp.where(use, seq[rows, jnp.maximum(latest, 0)], prediction)
            found |= latest >= 0
        return prediction

    def distributions(self, seq: jax.Array, ends: jax.Array) -> jax.Array:
        return jax.nn.one_hot(self.predict(seq, ends), self.vocab_size, dtype=jnp.float32)

    def describe(self) -> str:
        return f"ngram(n={self.n})"

    # The `decoding.drafter.Drafter` interface: no state; its logits are 0 on the predicted token
    # and the float32 minimum elsewhere, so every sampling rule turns them into the same one-hot law.
    def init_state(self, batch: int, size: int) -> None:
        return None

    def score(self, state: None, seq: jax.Array, ends: jax.Array, window: int) -> tuple[jax.Array, None]:
        hit = jax.nn.one_hot(self.predict(seq, ends), self.vocab_size, dtype=bool)
        return jnp.where(hit, 0.0, jnp.finfo(jnp.float32).min), None
