"""One decoder for Llama/Mistral/Qwen2/SmolLM2, GPT-2 and GPT-NeoX, driven by `ModelConfig`.

Weights are an explicit tree with layers stacked on a leading axis and scanned over.
`forward(params, config, tokens[B, T], cache) -> (logits[B, T, V], cache)` is pure: it writes
the T new tokens of each row at that row's own cache offset and advances `lengths` by T.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hsd_jax.models.cache import KVCache
from hsd_jax.models.config import ModelConfig, llama3_inv_freq

Params = dict[str, Any]

# Logical axis names of every weight. `hsd_jax.sharding` maps them onto mesh axes.
_NORM = {"scale": ("layers", "embed"), "bias": ("layers", "embed")}


def param_logical_axes(config: ModelConfig) -> Params:
    """The logical sharding annotation of every weight, as a tree shaped like the params."""
    layer: Params = {
        "attn_norm": _norm_axes(config, stacked=True),
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": _norm_axes(config, stacked=True),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if config.qkv_bias:
        layer |= {"bq": ("layers", "heads", "head_dim"), "bk": ("layers", "kv_heads", "head_dim"),
                  "bv": ("layers", "kv_heads", "head_dim")}
    if config.out_bias:
        layer["bo"] = ("layers", "embed")
    if config.mlp == "gated":
        layer["w_gate"] = ("layers", "embed", "mlp")
    if config.mlp_bias:
        layer |= {"b_up": ("layers", "mlp"), "b_down": ("layers", "embed")}
        if config.mlp == "gated":
            layer["b_gate"] = ("layers", "mlp")
    tree: Params = {"embed": ("vocab", "embed"), "layers": layer,
                    "final_norm": _norm_axes(config, stacked=False)}
    if config.positions == "learned":
        tree["pos_embed"] = (None, "embed")
    if config.head_vocab_size:
        tree |= {"lm_head": ("embed", "head_vocab"), "head_ids": ("head_vocab",)}
    elif not config.tie_word_embeddings:
        tree["lm_head"] = ("embed", "vocab")
    return tree


def _norm_axes(config: ModelConfig, stacked: bool) -> Params:
    axes = {k: v if stacked else v[1:] for k, v in _NORM.items()}
    return axes if config.norm == "layer" else {"scale": axes["scale"]}


def param_shapes(config: ModelConfig) -> Params:
    """The shape of every weight, as a tree shaped like the params."""
    c = config
    sizes = {"layers": c.num_layers, "embed": c.hidden_size, "heads": c.num_heads,
             "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "mlp": c.intermediate_size,
             "vocab": c.vocab_size, "head_vocab": c.head_vocab_size, None: c.max_position_embeddings}
    return jax.tree.map(lambda axes: tuple(sizes[a] for a in axes), param_logical_axes(config),
                        is_leaf=lambda x: isinstance(x, tuple))


INTEGER_PARAMS = ("head_ids",)  # index weights: never cast, never trained


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> Params:
    """Shape and dtype of every weight (`dtype` for all but the integer `INTEGER_PARAMS`)."""
    shapes = param_shapes(config)
    out = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
    for name in INTEGER_PARAMS:
        if name in out:
            out[name] = jax.ShapeDtypeStruct(shapes[name], jnp.int32)
    return out


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random weights (normal * scale; norm scales 1, biases 0) for tests and distillation."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if any(f"'{name}'" in path for name in INTEGER_PARAMS):
            out.append(jnp.arange(shape[0], dtype=jnp.int32))
        elif "scale" in path:
            out.append(jnp.ones(shape, dtype))
        elif "'b" in path or "bias" in path:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((scale * jax.random.normal(k, shape)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


# The CPU decode layout's out-major [out, in] matrices and the stacked weights each one fuses.
_OUT_MAJOR = {"wqkv_t": ("wq", "wk", "wv"), "wo_t": ("wo",), "w_gate_up_t": ("w_gate", "w_up"),
              "w_up_t": ("w_up",), "w_down_t": ("w_down",)}


def _fuse(layer: Params) -> Params:
    """Out-major matrices: one [(H + 2*H_kv)*hd, D] for q, k, v, one [2F, D] for gate and up."""
    out = dict(layer)
    qkv = jnp.concatenate([out.pop(n) for n in ("wq", "wk", "wv")], axis=-2)
    out["wqkv_t"] = qkv.reshape(qkv.shape[0], -1).T
    wo = out.pop("wo")
    out["wo_t"] = wo.reshape(-1, wo.shape[-1]).T
    if "w_gate" in out:
        out["w_gate_up_t"] = jnp.concatenate([out.pop("w_gate"), out.pop("w_up")], axis=-1).T
    else:
        out["w_up_t"] = out.pop("w_up").T
    out["w_down_t"] = out.pop("w_down").T
    return out


def _unfuse(layer: Params, config: ModelConfig) -> Params:
    out = dict(layer)
    if "wqkv_t" not in out:
        return out
    heads, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    qkv = out.pop("wqkv_t").T.reshape(-1, heads + 2 * kv, hd)
    out["wq"], out["wk"], out["wv"] = jnp.split(qkv, [heads, heads + kv], axis=-2)
    out["wo"] = out.pop("wo_t").T.reshape(heads, hd, -1)
    if "w_gate_up_t" in out:
        out["w_gate"], out["w_up"] = jnp.split(out.pop("w_gate_up_t").T, 2, axis=-1)
    else:
        out["w_up"] = out.pop("w_up_t").T
    out["w_down"] = out.pop("w_down_t").T
    return out


def unstack_layers(params: Params) -> Params:
    """The CPU decode layout: per-layer weight trees of fused, out-major [out, in] matrices, and
    the head both as [D, V] and as [V, D].

    On XLA:CPU (2-core EPYC, measured): a scanned layer's weights are copied out of the stack
    on every step (a dynamic slice it cannot fuse into the dot), doubling decode memory traffic;
    x[T, in] @ W[in, out] runs about 2x slower for T = 2..8 rows than W^T[out, in] @ x^T (30
    [576, 3072] products at T=8: 30.6 ms vs 16.0 ms), while a single row is fastest against the
    [D, V] head and several rows against [V, D]; and every extra small dot costs a dispatch.
    Separate per-layer buffers, fused out-major projections and both head orientations avoid
    all of these, at the cost of a longer compile (the layer loop is unrolled) and V*D more
    resident weights.
    """
    if isinstance(params["layers"], (list, tuple)):
        return params
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    out = {**params, "layers": tuple(_fuse(jax.tree.map(lambda x: x[i], layers)) for i in range(count))}
    if "lm_head" not in out:
        out["lm_head"] = jnp.asarray(params["embed"].T)
    if "head_ids" not in out:
        out["lm_head_t"] = params["embed"] if "lm_head" not in params else jnp.asarray(out["lm_head"].T)
    return out


def stack_layers(params: Params, config: ModelConfig) -> Params:
    """Inverse of `unstack_layers`: the storage and sharding layout of `param_shapes(config)`."""
    if not isinstance(params["layers"], (list, tuple)):
        return params
    layers = [_unfuse(layer, config) for layer in params["layers"]]
    out = {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    out.pop("lm_head_t", None)
    if config.tie_word_embeddings:
        out.pop("lm_head", None)
    return out


LAYOUTS = ("auto", "stacked", "unstacked")


def with_layout(params: Params, config: ModelConfig, layout: str = "auto") -> Params:
    """'stacked' scans over layers (fast compile; the layout to store and shard); 'unstacked' is
    the CPU decode layout of `unstack_layers`; 'auto' picks unstacked on CPU, stacked elsewhere."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layer layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = "unstacked" if jax.default_backend() == "cpu" else "stacked"
    return unstack_layers(params) if layout == "unstacked" else stack_layers(params, config)


@struct.dataclass
class Model:
    """A decoder: weights (pytree leaves) and config (static)."""

    params: Params
    config: ModelConfig = struct.field(pytree_node=False)
    # An `hsd_jax.sharding.ModelSharding` (mesh and rule) once placed on a device mesh: fresh KV
    # caches are pinned to it. None: unsharded.
    sharding: Any = struct.field(pytree_node=False, default=None)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def init_cache(self, batch: int, size: int) -> KVCache:
        cache = KVCache.init(self.config, batch, size, self.dtype)
        return cache if self.sharding is None else self.sharding.constrain_cache(cache)

    def with_layout(self, layout: str) -> "Model":
        return self.replace(params=with_layout(self.params, self.config, layout))

    def step(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        return forward(self.params, self.config, tokens, cache)

    @property
    def num_params(self) -> int:
        """Distinct weights: the CPU layout's transposed head copy, and a tied head, count once; an
        int8 weight counts its values, not its scales; index arrays (head_ids) do not count."""
        from hsd_jax.models.quantize import Int8Weight

        params = {k: v for k, v in self.params.items() if k != "lm_head_t"}
        if self.config.tie_word_embeddings and "head_ids" not in params:
            params.pop("lm_head", None)
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
        return int(sum(np.prod((x.q if isinstance(x, Int8Weight) else x).shape) for x in leaves
                       if isinstance(x, Int8Weight) or x.dtype != jnp.int32))


# ---------------------------------------------------------------------------- layers


def _norm(x: jax.Array, weights: Params, config: ModelConfig) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if config.norm == "rms":
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + config.norm_eps)
        return weights["scale"] * x.astype(dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + config.norm_eps)
    return (x * weights["scale"] + weights["bias"]).astype(dtype)


def _activation(x: jax.Array, name: str) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=name == "gelu_new")


def _rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, rotary_dims: int) -> jax.Array:
    """HF's rotate-half RoPE on the first `rotary_dims` of each head. x: [B, T, H, D]."""
    rot, passthrough = x[..., :rotary_dims], x[..., rotary_dims:]
    half = rotary_dims // 2
    x1, x2 = rot[..., :half], rot[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), passthrough], axis=-1)


def _mlp(x: jax.Array, lp: Params, config: ModelConfig) -> jax.Array:
    if "w_gate_up_t" in lp:
        gate, up = jnp.split(_dense_t(x, lp["w_gate_up_t"]), 2, axis=-1)
    else:
        up = _dense(x, lp, "w_up", "btd,df->btf")
        gate = _dense(x, lp, "w_gate", "btd,df->btf") if config.mlp == "gated" else None
    up = up + (lp["b_up"] if config.mlp_bias else 0)
    if config.mlp == "gated":
        gate = gate + (lp["b_gate"] if config.mlp_bias else 0)
        hidden = _activation(gate, config.activation) * up
    else:
        hidden = _activation(up, config.activation)
    return _dense(hidden, lp, "w_down", "btf,fd->btd") + (lp["b_down"] if config.mlp_bias else 0)


def _dense(x: jax.Array, lp: Params, name: str, spec: str) -> jax.Array:
    """x times weight `name`: the out-major `{name}_t` of the CPU layout if present, else
    `einsum(spec, x, lp[name])`. x's trailing axes are the contracted ones."""
    if name + "_t" in lp:
        return _dense_t(x.reshape(*x.shape[:2], -1), lp[name + "_t"])
    return jnp.einsum(spec, x, lp[name])


def _dense_t(x: jax.Array, w: Any) -> jax.Array:
    """x [B, T, in] times an out-major w [out, in], as (w @ x^T)^T; or a `quantize.Int8Weight`."""
    if hasattr(w, "in_dims"):
        from hsd_jax.models.quantize import int8_matmul

        return int8_matmul(x, w).astype(x.dtype)
    return jnp.einsum("oi,bti->bto", w, x)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B,T,H,D], k/v [B,S,Hkv,D], mask [B,T,S] -> [B,T,H,D]."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def hidden_states(params: Params, config: ModelConfig, tokens: jax.Array,
                  cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run the decoder body: final-normed hidden states [B, T, D] and the updated cache."""
    chex.assert_rank(tokens, 2)
    batch, steps = tokens.shape
    chex.assert_equal(cache.batch, batch)
    positions = cache.lengths[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
    x = jnp.take(params["embed"], tokens, axis=0)
    if config.positions == "learned":
        x = x + jnp.take(params["pos_embed"], positions, axis=0, mode="clip")
        cos = sin = None
    else:
        inv_freq = jnp.asarray(np.asarray(llama3_inv_freq(config), np.float32))
        angles = positions[..., None].astype(jnp.float32) * inv_freq
        cos, sin = jnp.cos(angles), jnp.sin(angles)

    key_positions = jnp.arange(cache.size, dtype=jnp.int32)
    mask = key_positions[None, None, :] <= positions[:, :, None]
    if config.sliding_window:
        mask &= positions[:, :, None] - key_positions[None, None, :] < config.sliding_window

    def layer(carry, scanned):
        x, cache = carry
        lp, index = scanned
        h = _norm(x, lp["attn_norm"], config)
        if "wqkv_t" in lp:
            qkv = _dense_t(h, lp["wqkv_t"]).reshape(batch, steps, -1, config.head_dim)
            q, k, v = jnp.split(qkv, [config.num_heads, config.num_heads + config.num_kv_heads], axis=2)
        else:
            q, k, v = (jnp.einsum("btd,dhk->bthk", h, lp[n]) for n in ("wq", "wk", "wv"))
        if config.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        if cos is not None:
            q = _rotary(q, cos, sin, config.rotary_dims)
            k = _rotary(k, cos, sin, config.rotary_dims)
        cache = cache.write_layer(index, k, v)
        attn = _attention(q, cache.k[index], cache.v[index], mask)
        attn = _dense(attn, lp, "wo", "bthk,hkd->btd")
        if config.out_bias:
            attn = attn + lp["bo"]
        if config.parallel_residual:
            x = x + attn + _mlp(_norm(x, lp["mlp_norm"], config), lp, config)
        else:
            x = x + attn
            x = x + _mlp(_norm(x, lp["mlp_norm"], config), lp, config)
        return (x, cache), None

    if isinstance(params["layers"], (list, tuple)):  # unstacked: one weight tree per layer
        for index, lp in enumerate(params["layers"]):
            (x, cache), _ = layer((x, cache), (lp, index))
    else:
        layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(layer, (x, cache), (params["layers"], layer_ids))
    x = _norm(x, params["final_norm"], config)
    return x, cache.with_lengths(cache.lengths + steps)


def logits_from_hidden(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Project hidden states [..., D] to float32 logits [..., V]."""
    if "lm_head" not in params:  # tied, stacked layout
        return jnp.einsum("...d,vd->...v", x, params["embed"], preferred_element_type=jnp.float32)
    rows = math.prod(x.shape[:-1])
    if hasattr(params["lm_head"], "in_dims"):
        from hsd_jax.models.quantize import int8_matmul

        out = int8_matmul(x, params["lm_head"])
    elif rows > 1 and "lm_head_t" in params:  # several rows: the out-major [V, D] copy is faster
        out = jnp.einsum("vd,...d->...v", params["lm_head_t"], x, preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum("...d,dv->...v", x, params["lm_head"], preferred_element_type=jnp.float32)
    if "head_ids" in params:  # a vocabulary-subset head: q = 0 outside it
        full = jnp.full((*out.shape[:-1], config.vocab_size), jnp.finfo(jnp.float32).min, jnp.float32)
        out = full.at[..., params["head_ids"]].set(out)
    return out


def forward(params: Params, config: ModelConfig, tokens: jax.Array,
            cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The pure step: `logits[B, T, V] (float32), cache = forward(params, config, tokens[B, T], cache)`."""
    x, cache = hidden_states(params, config, tokens, cache)
    logits = logits_from_hidden(params, config, x)
    chex.assert_shape(logits, (*tokens.shape, config.vocab_size))
    return logits, cache


decode_step = jax.jit(forward, static_argnums=1, donate_argnums=3)
