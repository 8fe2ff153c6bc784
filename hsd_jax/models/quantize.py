"""Int8 copies of a model, for use as a high-acceptance self-draft.

Every projection matrix is stored as int8 with one float32 scale per output column (symmetric,
round-to-nearest); activations are quantised per token on the fly (dynamic absmax), and the
product runs as an int8 x int8 -> int32 dot. Norms and embeddings stay float32. A quantised copy
is only ever a draft: verification against the float32 target keeps the output exact.

On a CPU with AVX512-VNNI the weights are packed for our kernel (`Int8Weight.packed`,
`cpu_kernel.packed_int8_matmul`: VPDPBUSD, the same quantisation and exact integer sums, so the
same result). Elsewhere XLA's int8 dot runs; on XLA:CPU a one-row int8 dot takes a slow path, so
one-row products are padded to two rows (measured on the 2-core EPYC: 30 [576, 3072] products,
T=1 float32 9.6 ms, int8 122 ms unpadded, 7.0 ms at two rows; T=8 float32 23.0 ms, int8 11.6 ms).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

import hsd_jax.models.cpu_kernel as cpu_kernel


@struct.dataclass
class Int8Weight:
    """A weight `[in..., out...]` as int8 `q` and per-output float32 `scale`; `in_dims` leading
    axes contract with the activations. `q` may be a `cpu_kernel.PackedWeight` (`packed`)."""

    q: jax.Array
    scale: jax.Array
    in_dims: int = struct.field(pytree_node=False)

    @classmethod
    def quantize(cls, w: jax.Array, in_dims: int) -> Int8Weight:
        w = jnp.asarray(w, jnp.float32)
        absmax = jnp.max(jnp.abs(w), axis=tuple(range(in_dims)))
        scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
        return cls(q=jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale=scale, in_dims=in_dims)

    def packed(self) -> Int8Weight:
        """This weight packed for our CPU kernel (a [K, N] weight; check `cpu_kernel.available(int8)`)."""
        if self.in_dims != 1 or self.q.ndim != 2:
            raise ValueError("only [in, out] int8 weights pack for the CPU kernel")
        return self.replace(q=cpu_kernel.PackedWeight.pack(self.q))

    def dequantize(self) -> jax.Array:
        return cpu_kernel.unpacked(self.q).astype(jnp.float32) * self.scale


def int8_matmul(x: jax.Array, w: Int8Weight) -> jax.Array:
    """x [..., in...] @ w -> float32 [..., out...] with per-token dynamic activation scales."""
    if isinstance(w.q, cpu_kernel.PackedWeight):
        return cpu_kernel.packed_int8_matmul(x, w.q, w.scale)
    in_shape, out_shape = w.q.shape[:w.in_dims], w.q.shape[w.in_dims:]
    lead = x.shape[:x.ndim - w.in_dims]
    rows = x.reshape(-1, math.prod(in_shape)).astype(jnp.float32)
    n = rows.shape[0]
    if n == 1:  # XLA:CPU's one-row int8 dot is ~15x slower than a two-row one
        rows = jnp.concatenate([rows, rows], axis=0)
    absmax = jnp.max(jnp.abs(rows), axis=-1, keepdims=True)
    x_scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    xq = jnp.clip(jnp.round(rows / x_scale), -127, 127).astype(jnp.int8)
    wq = w.q.reshape(xq.shape[1], -1)
    acc = jax.lax.dot(xq, wq, preferred_element_type=jnp.int32)
    out = acc[:n].astype(jnp.float32) * x_scale[:n] * w.scale.reshape(-1)
    return out.reshape(*lead, *out_shape)
