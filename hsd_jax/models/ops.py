"""The decoder's building blocks: one dense op for every weight kind, norms, RoPE, attention."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from hsd_jax.models.codes import CodedWeight, coded_matmul
from hsd_jax.models.config import ModelConfig
from hsd_jax.models.cpu_kernel import PackedWeight, packed_matmul, row_sums
from hsd_jax.models.quantize import Int8Weight, int8_matmul


def dense(x: jax.Array, w: Any, in_dims: int = 1, out_dtype: Any = None) -> jax.Array:
    """x [..., in...] times w [in..., out...] -> [..., out...]: x's last `in_dims` axes contract with
    w's first `in_dims`. Float weights accumulate in float32 (x is cast to the weights' dtype); an
    `Int8Weight` runs an int8 dot, a `PackedWeight` (the CPU layout of float32 and bfloat16
    weights where our kernel runs) or a `CodedWeight` (float32 weights stored as block codes) that
    kernel (`models.cpu_kernel`). The result is `out_dtype`
    (default: x's dtype).

    On XLA:CPU a one-row dot against bfloat16 weights converts the whole weight to float32 on every
    call, while two or more rows run YNNPACK's native bf16 kernel (../shared/cpu-dots.md), so a
    single row is computed as two there. Other backends run the plain dot.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if isinstance(w, Int8Weight):
        return int8_matmul(x, w).astype(out_dtype)
    if isinstance(w, PackedWeight):
        return packed_matmul(x, w).astype(out_dtype)
    if isinstance(w, CodedWeight):
        return coded_matmul(x, w).astype(out_dtype)
    lead = x.shape[:x.ndim - in_dims]
    x = x.astype(w.dtype)
    single_bf16_row = math.prod(lead) == 1 and w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
    if single_bf16_row:
        x = jnp.concatenate([x.reshape(1, *x.shape[len(lead):])] * 2, axis=0)
    contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
    out = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)
    if single_bf16_row:
        out = out[:1].reshape(*lead, *out.shape[1:])
    return out.astype(out_dtype)


def norm(x: jax.Array, weights: dict[str, jax.Array], config: ModelConfig,
         rowwise: bool = False) -> jax.Array:
    """RMS or layer norm over the last axis, in float32. `rowwise`: the means from our CPU kernel's
    row sums (`cpu_kernel.row_sums`), whose order does not depend on the number of rows."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if rowwise:
        def mean(v):
            return row_sums(v) / v.shape[-1]
    else:
        def mean(v):
            return jnp.mean(v, axis=-1, keepdims=True)
    if config.norm == "rms":
        x = x * jax.lax.rsqrt(mean(x * x) + config.norm_eps)
        return weights["scale"] * x.astype(dtype)
    mean_x = mean(x)
    var = mean(jnp.square(x - mean_x))
    x = (x - mean_x) * jax.lax.rsqrt(var + config.norm_eps)
    return (x * weights["scale"] + weights["bias"]).astype(dtype)


def activation(x: jax.Array, name: str) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=name == "gelu_new")


def rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, rotary_dims: int) -> jax.Array:
    """HF's rotate-half RoPE on the first dimensions of each head. x: [B, T, H, D]; cos, sin
    [B, T, ceil(rotary_dims / 2)]. Like transformers, an odd `rotary_dims` (e.g. GPT-NeoX's head_dim
    12 x 0.25 = 3) rotates 2 * ceil(rotary_dims / 2) dimensions: the width of its cos/sin tables."""
    half = cos.shape[-1]
    width = 2 * half
    if width > x.shape[-1] or half != (rotary_dims + 1) // 2:
        raise ValueError(f"rotary width {rotary_dims} does not fit heads of {x.shape[-1]} dimensions")
    rot, passthrough = x[..., :width], x[..., width:]
    x1, x2 = rot[..., :half], rot[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), passthrough], axis=-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B,T,H,D], k/v [B,S,Hkv,D], mask [B,T,S] -> [B,T,H,D]."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    # In float32 whatever the cache dtype: XLA:CPU runs batched bfloat16 dots through a slow path.
    q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(b, t, h, d)
