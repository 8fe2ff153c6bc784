"""The weight spec: one `ParamSpec` per leaf (shape, logical axes, initializer), from the config.

This is the *storage* layout: layers stacked on a leading axis, the layout checkpoints hold and
`parallel.sharding` maps onto a mesh. `models.layouts` derives the runtime layouts from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from hsd_jax.models.config import ModelConfig

Params = dict[str, Any]
Initializer = Literal["normal", "ones", "zeros", "arange"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: its shape, the logical name of each axis, and how it is initialised."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Initializer = "normal"

    @property
    def integer(self) -> bool:
        """Index arrays (a subset head's token ids): int32, never cast, never trained."""
        return self.init == "arange"

    def initialize(self, key: jax.Array, dtype: Any, scale: float) -> jax.Array:
        if self.init == "arange":
            return jnp.arange(self.shape[0], dtype=jnp.int32)
        if self.init == "ones":
            return jnp.ones(self.shape, dtype)
        if self.init == "zeros":
            return jnp.zeros(self.shape, dtype)
        return (scale * jax.random.normal(key, self.shape)).astype(dtype)


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def param_specs(config: ModelConfig) -> Params:
    """Every weight's `ParamSpec`, as a tree shaped like the (stacked) params."""
    c = config
    sizes = {"layers": c.num_layers, "embed": c.hidden_size, "heads": c.num_heads,
             "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "mlp": c.intermediate_size,
             "vocab": c.vocab_size, "head_vocab": c.head_vocab_size, "positions": c.max_position_embeddings}

    def spec(*axes: str | None, init: Initializer = "normal") -> ParamSpec:
        return ParamSpec(
            tuple(sizes[a] for a in axes), tuple(None if a == "positions" else a for a in axes), init
        )

    def norm(*lead: str) -> Params:
        out = {"scale": spec(*lead, "embed", init="ones")}
        if c.norm == "layer":
            out["bias"] = spec(*lead, "embed", init="zeros")
        return out

    layer: Params = {
        "attn_norm": norm("layers"),
        "wq": spec("layers", "embed", "heads", "head_dim"),
        "wk": spec("layers", "embed", "kv_heads", "head_dim"),
        "wv": spec("layers", "embed", "kv_heads", "head_dim"),
        "wo": spec("layers", "heads", "head_dim", "embed"),
        "mlp_norm": norm("layers"),
        "w_up": spec("layers", "embed", "mlp"),
        "w_down": spec("layers", "mlp", "embed"),
    }
    if c.qkv_bias:
        layer |= {"bq": spec("layers", "heads", "head_dim", init="zeros"),
                  "bk": spec("layers", "kv_heads", "head_dim", init="zeros"),
                  "bv": spec("layers", "kv_heads", "head_dim", init="zeros")}
    if c.out_bias:
        layer["bo"] = spec("layers", "embed", init="zeros")
    if c.mlp == "gated":
        layer["w_gate"] = spec("layers", "embed", "mlp")
    if c.mlp_bias:
        layer |= {
            "b_up": spec("layers", "mlp", init="zeros"),
            "b_down": spec("layers", "embed", init="zeros"),
        }
        if c.mlp == "gated":
            layer["b_gate"] = spec("layers", "mlp", init="zeros")
    tree: Params = {"embed": spec("vocab", "embed"), "layers": layer, "final_norm": norm()}
    if c.positions == "learned":
        tree["pos_embed"] = spec("positions", "embed")
    if c.head_vocab_size:
        tree |= {"lm_head": spec("embed", "head_vocab"), "head_ids": spec("head_vocab", init="arange")}
    elif not c.tie_word_embeddings:
        tree["lm_head"] = spec("embed", "vocab")
    return tree


def param_logical_axes(config: ModelConfig) -> Params:
    """The logical sharding annotation of every weight, as a tree shaped like the params."""
    return jax.tree.map(lambda s: s.axes, param_specs(config), is_leaf=_is_spec)


def param_shapes(config: ModelConfig) -> Params:
    """The shape of every weight, as a tree shaped like the params."""
    return jax.tree.map(lambda s: s.shape, param_specs(config), is_leaf=_is_spec)


def abstract_params(config: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """Shape and dtype of every weight (`dtype` for all but the integer index arrays)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.int32 if s.integer else dtype),
                        param_specs(config), is_leaf=_is_spec)


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, scale: float = 0.02) -> Params:
    """Random weights (normal * scale; norm scales 1, biases 0) for tests and distillation."""
    specs, treedef = jax.tree.flatten(param_specs(config), is_leaf=_is_spec)
    keys = jax.random.split(key, len(specs))
    return jax.tree.unflatten(treedef, [s.initialize(k, dtype, scale) for s, k in zip(specs, keys)])


INTEGER_PARAMS = ("head_ids",)  # the spec's integer leaves (init "arange"): never cast, never trained
