"""One decoder for Llama/Mistral/Qwen2/SmolLM2, GPT-2 and GPT-NeoX, driven by `ModelConfig`.

`forward(params, config, tokens[B, T], cache, layout) -> (logits[B, T, V], cache)` is pure: it
writes the T new tokens of each row at that row's own cache offset and advances `lengths` by T.
The weight layout (`models.layouts`) is static: a `Model` carries it, and the functions take it.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import hsd_jax.models.cpu_kernel as cpu_kernel
from hsd_jax.models.cache import KVCache
from hsd_jax.models.codes import CodedWeight
from hsd_jax.models.config import ModelConfig, llama3_inv_freq
from hsd_jax.models.layouts import STACKED, Layout, check_params, with_layout
from hsd_jax.models.ops import activation, attention, dense, norm, rotary
from hsd_jax.models.params import Params
from hsd_jax.models.quantize import Int8Weight


@struct.dataclass
class Model:
    """A decoder: weights (pytree leaves), config and weight layout (static)."""

    params: Params
    config: ModelConfig = struct.field(pytree_node=False)
    # An `hsd_jax.parallel.sharding.ModelSharding` (mesh and rule) once placed on a device mesh:
    # fresh KV caches are pinned to it. None: unsharded.
    sharding: Any = struct.field(pytree_node=False, default=None)
    layout: Layout = struct.field(pytree_node=False, default=STACKED)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self):
        return self.params["embed"].dtype

    @property
    def num_params(self) -> int:
        """Distinct weights: a tied head counts once; an int8 weight counts its values, not its
        scales; index arrays (head_ids) and vocabulary padding (`parallel.sharding`) do not count."""
        params = dict(self.params)
        if self.config.tie_word_embeddings and not self.config.head_vocab_size:
            params.pop("lm_head", None)
        weights = (Int8Weight, CodedWeight, cpu_kernel.PackedWeight)
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, weights))
        padding = (params["embed"].shape[0] - self.config.vocab_size) * params["embed"].shape[1]
        if "lm_head" in params and not self.config.head_vocab_size:  # padded with the embedding
            padding *= 2
        return int(sum(np.prod((x.q if isinstance(x, Int8Weight) else x).shape) for x in leaves
                       if isinstance(x, weights) or x.dtype != jnp.int32)) - padding

    def describe(self) -> str:
        suffix = "-int8" if self.layout.int8 else ""
        return f"{self.config.model_type}{suffix}({self.num_params / 1e6:.1f}M)"

    @property
    def cache_dtype(self):
        """The KV cache's dtype: the weights' dtype, except float32 on CPU, where XLA scatters into a
        bfloat16 cache slowly (a bf16 SmolLM2 step at T=2: 53 ms with a bf16 cache, 30 ms with f32)."""
        return jnp.float32 if jax.default_backend() == "cpu" else self.dtype

    def init_cache(self, batch: int, size: int) -> KVCache:
        cache = KVCache.init(self.config, batch, size, self.cache_dtype)
        return cache if self.sharding is None else self.sharding.constrain_cache(cache)

    def with_layout(self, layout: str | Layout) -> Model:
        params, layout = with_layout(self.params, self.config, layout)
        return self.replace(params=params, layout=layout)

    def step(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        return forward(self.params, self.config, tokens, cache, self.layout)

    def hidden(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        return hidden_states(self.params, self.config, tokens, cache, self.layout)

    def logits(self, x: jax.Array) -> jax.Array:
        return logits_from_hidden(self.params, self.config, x, self.layout)

    # The `decoding.drafter.Drafter` interface.
    def init_state(self, batch: int, size: int) -> KVCache:
        return self.init_cache(batch, size)

    def score(
        self, cache: KVCache, seq: jax.Array, ends: jax.Array, window: int
    ) -> tuple[jax.Array, KVCache]:
        """Logits of the tokens at positions `ends` [B, C], feeding `window` tokens of `seq` from
        the cache length on in one pass; returns them and the advanced cache."""
        start = cache.lengths
        positions = jnp.clip(start[:, None] + jnp.arange(window)[None, :], 0, seq.shape[1] - 1)
        x, cache = self.hidden(jnp.take_along_axis(seq, positions, axis=1), cache)
        query = jnp.clip(ends - 1 - start[:, None], 0, window - 1)
        return self.logits(jnp.take_along_axis(x, query[..., None], axis=1)), cache


def _mlp(x: jax.Array, lp: Params, config: ModelConfig, layout: Layout) -> jax.Array:
    if config.mlp == "gated" and not layout.stacked:
        gate, up = jnp.split(dense(x, lp["w_gate_up"]), 2, axis=-1)
    else:
        up = dense(x, lp["w_up"])
        gate = dense(x, lp["w_gate"]) if config.mlp == "gated" else None
    up = up + (lp["b_up"] if config.mlp_bias else 0)
    if config.mlp == "gated":
        gate = gate + (lp["b_gate"] if config.mlp_bias else 0)
        hidden = activation(gate, config.activation) * up
    else:
        hidden = activation(up, config.activation)
    return dense(hidden, lp["w_down"]) + (lp["b_down"] if config.mlp_bias else 0)


def _qkv(h: jax.Array, lp: Params, config: ModelConfig, layout: Layout) -> tuple[jax.Array, ...]:
    if layout.stacked:
        return tuple(dense(h, lp[n]) for n in ("wq", "wk", "wv"))
    qkv = dense(h, lp["wqkv"]).reshape(*h.shape[:2], -1, config.head_dim)
    return tuple(jnp.split(qkv, [config.num_heads, config.num_heads + config.num_kv_heads], axis=2))


ROTARY_TABLE_POSITIONS = 16384  # models with at most this many positions read cos/sin from tables


def _rotary_cos_sin(config: ModelConfig, positions: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles (float32 position x inverse frequency, as transformers computes
    them) at `positions` [B, T] of a cache of `size` positions: [B, T, ceil(rotary_dims / 2)] each.

    For a model of at most ROTARY_TABLE_POSITIONS positions they are read from tables of every cache
    position, built once with numpy (float64 cos and sin, rounded): XLA:CPU fuses an in-graph cos
    and sin into each layer's rotation and evaluates them again for every layer and head (about 7%
    of a 16-token pass of SmolLM2-135M). The choice depends on the model, never on the cache size:
    AR and HSD size their caches differently, and a position's angle must come out the same bits in
    both. Positions past the cache (rows whose cache writes are dropped) read its last row."""
    inv_freq = np.asarray(llama3_inv_freq(config), np.float32)
    if config.max_position_embeddings > ROTARY_TABLE_POSITIONS:
        angles = positions[..., None].astype(jnp.float32) * inv_freq
        return jnp.cos(angles), jnp.sin(angles)
    angles = (np.arange(size, dtype=np.float32)[:, None] * inv_freq).astype(np.float64)
    tables = (np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32))
    return tuple(jnp.take(jnp.asarray(t), positions, axis=0, mode="clip") for t in tables)


def hidden_states(params: Params, config: ModelConfig, tokens: jax.Array, cache: KVCache,
                  layout: Layout = STACKED) -> tuple[jax.Array, KVCache]:
    """Run the decoder body: final-normed hidden states [B, T, D] and the updated cache."""
    chex.assert_rank(tokens, 2)
    check_params(params, config, layout)
    batch, steps = tokens.shape
    chex.assert_equal(cache.batch, batch)
    positions = cache.lengths[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
    # The CPU layout runs attention (reading the layer's cache in place), the norms' sums and a bf16
    # table's embedding rows on our kernel where it runs (`cpu_kernel`): row by row, so a row's
    # logits do not depend on how many rows a pass holds (a k-token check computes what k one-token
    # steps do).
    rowwise = (not layout.stacked and cache.k.dtype == jnp.float32 and config.head_dim <= 256
               and cpu_kernel.rows_available())
    if rowwise and params["embed"].dtype == jnp.bfloat16:  # the residual stream stays float32
        x = cpu_kernel.embedding_rows(params["embed"], tokens)
    else:
        x = jnp.take(params["embed"], tokens, axis=0).astype(jnp.float32)
    if config.positions == "learned":
        x = x + jnp.take(params["pos_embed"], positions, axis=0, mode="clip")
        cos = sin = None
    else:
        cos, sin = _rotary_cos_sin(config, positions, cache.size)

    key_positions = jnp.arange(cache.size, dtype=jnp.int32)
    mask = key_positions[None, None, :] <= positions[:, :, None]
    if config.sliding_window:
        mask &= positions[:, :, None] - key_positions[None, None, :] < config.sliding_window

    def layer(carry, scanned):
        x, cache = carry
        lp, index = scanned
        h = norm(x, lp["attn_norm"], config, rowwise)
        q, k, v = _qkv(h, lp, config, layout)
        if config.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        if cos is not None:
            q = rotary(q, cos, sin, config.rotary_dims)
            k = rotary(k, cos, sin, config.rotary_dims)
        cache = cache.write_layer(index, k, v)
        if rowwise:
            attn = cpu_kernel.cached_attention(q, cache.k, cache.v, index, mask)
        else:
            attn = attention(q, cache.k[index], cache.v[index], mask)
        attn = (
            dense(attn, lp["wo"], in_dims=2)
            if layout.stacked
            else dense(attn.reshape(batch, steps, -1), lp["wo"])
        )
        if config.out_bias:
            attn = attn + lp["bo"]
        if config.parallel_residual:
            x = x + attn + _mlp(norm(x, lp["mlp_norm"], config, rowwise), lp, config, layout)
        else:
            x = x + attn
            x = x + _mlp(norm(x, lp["mlp_norm"], config, rowwise), lp, config, layout)
        return (x, cache), None

    if layout.stacked:
        layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(layer, (x, cache), (params["layers"], layer_ids))
    else:  # one weight tree per layer, the loop unrolled
        for index, lp in enumerate(params["layers"]):
            (x, cache), _ = layer((x, cache), (lp, index))
    x = norm(x, params["final_norm"], config, rowwise)
    return x, cache.with_lengths(cache.lengths + steps)


def logits_from_hidden(
    params: Params, config: ModelConfig, x: jax.Array, layout: Layout = STACKED
) -> jax.Array:
    """Project hidden states [..., D] to float32 logits [..., V]."""
    if "lm_head" in params:
        out = dense(x, params["lm_head"], out_dtype=jnp.float32)
    else:  # tied head, stacked layout
        out = jnp.einsum("...d,vd->...v", x, params["embed"], preferred_element_type=jnp.float32)
    if out.shape[-1] > config.vocab_size:  # a vocabulary padded for tensor parallelism
        out = out[..., :config.vocab_size]
    if config.head_vocab_size:  # a vocabulary-subset head: q = 0 outside it
        full = jnp.full((*out.shape[:-1], config.vocab_size), jnp.finfo(jnp.float32).min, jnp.float32)
        out = full.at[..., params["head_ids"]].set(out)
    return out


def forward(params: Params, config: ModelConfig, tokens: jax.Array, cache: KVCache,
            layout: Layout = STACKED) -> tuple[jax.Array, KVCache]:
    """The pure step: `logits[B, T, V] (float32), cache = forward(params, config, tokens[B, T], cache)`."""
    x, cache = hidden_states(params, config, tokens, cache, layout)
    logits = logits_from_hidden(params, config, x, layout)
    chex.assert_shape(logits, (*tokens.shape, config.vocab_size))
    return logits, cache


decode_step = jax.jit(forward, static_argnums=(1, 4), donate_argnums=3)
