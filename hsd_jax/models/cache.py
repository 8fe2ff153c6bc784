"""Fixed-shape KV cache with a per-row fill level.

k and v are `[L, B, S, H_kv, D]`. Row b holds valid entries at positions `< lengths[b]`;
a step of T tokens writes row b at `lengths[b] .. lengths[b] + T - 1`. Rolling back is just
lowering `lengths` (no data moves): attention never reads a position beyond the query's own.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from hsd_jax.models.config import ModelConfig


@struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    lengths: jax.Array  # [B] int32

    @classmethod
    def init(cls, config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        """Roll back (or forward over already-written entries) by setting each row's fill level."""
        chex.assert_shape(lengths, (self.batch,))
        return self.replace(lengths=lengths.astype(jnp.int32))

    def write_layer(self, layer: jax.Array, k_new: jax.Array, v_new: jax.Array) -> KVCache:
        """Write `k_new, v_new [B, T, H_kv, D]` of one layer at each row's own offset.

        Writes past the end of the cache are dropped, never wrapped or shifted.
        """
        batch, steps = k_new.shape[:2]
        rows = jnp.arange(batch)[:, None]
        positions = self.lengths[:, None] + jnp.arange(steps)[None, :]
        k = self.k.at[layer, rows, positions].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[layer, rows, positions].set(v_new.astype(self.v.dtype), mode="drop")
        return self.replace(k=k, v=v)
