"""Runtime weight layouts, derived from the storage layout of `models.params`.

* ``stacked``: the storage tree; layers stacked on a leading axis and scanned over. The layout
  to store, to shard over a mesh, and to run on GPU/TPU (fast compile).
* ``unstacked``: the CPU decode layout. One weight tree per layer (the layer loop is unrolled,
  so no dynamic slice copies a layer out of the stack on every step), projections fused and
  in-major: q/k/v as one [D, (H + 2 H_kv) hd] matrix, gate/up as one [D, 2F], o as [H hd, D],
  down as [F, D], and an explicit head [D, V] (a tied head is materialised). In-major weights
  let XLA:CPU's YNNPACK dots use them without re-packing on every call (../shared/cpu-dots.md).
* ``int8``: the unstacked layout with every projection and the head as `Int8Weight` (packed for
  our kernel on AVX512-VNNI).

On a CPU with our kernel (`models.cpu_kernel.available(dtype)`), the unstacked layout holds every
projection and the head packed for it (`PackedWeight`); a float32 weight whose values are exactly
4- or 8-bit block codes (a GGUF Q4_1 or Q8_0 tensor dequantized) as those codes (`CodedWeight`:
the same products from 0.625 or 1.125 bytes a weight against 4).

The layout is a static field of `Model`; nothing infers it from the keys of the weight tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

import hsd_jax.models.cpu_kernel as cpu_kernel
from hsd_jax.models.codes import CodedWeight
from hsd_jax.models.config import ModelConfig
from hsd_jax.models.params import Params, param_specs
from hsd_jax.models.quantize import Int8Weight

LAYOUTS = ("auto", "stacked", "unstacked")


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: Literal["stacked", "unstacked"] = "stacked"
    int8: bool = False

    def __post_init__(self):
        if self.kind not in ("stacked", "unstacked"):
            raise ValueError(f"unknown layer layout {self.kind!r}; choose one of {', '.join(LAYOUTS)}")
        if self.int8 and self.kind != "unstacked":
            raise ValueError("int8 weights exist only in the unstacked layout")

    @property
    def stacked(self) -> bool:
        return self.kind == "stacked"

    @property
    def name(self) -> str:
        return "int8" if self.int8 else self.kind


STACKED = Layout("stacked")
UNSTACKED = Layout("unstacked")
INT8 = Layout("unstacked", int8=True)

FUSED_PROJECTIONS = ("wqkv", "wo", "w_gate_up", "w_up", "w_down")


def resolve(layout: str | Layout) -> Layout:
    """A Layout from a name: 'auto' is unstacked on CPU and stacked elsewhere."""
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layer layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = "unstacked" if jax.default_backend() == "cpu" else "stacked"
    return Layout(layout)


def _fuse(layer: Params) -> Params:
    out = dict(layer)
    qkv = jnp.concatenate([out.pop(n) for n in ("wq", "wk", "wv")], axis=-2)  # [D, H + 2 H_kv, hd]
    out["wqkv"] = qkv.reshape(qkv.shape[0], -1)
    wo = out.pop("wo")
    out["wo"] = wo.reshape(-1, wo.shape[-1])
    if "w_gate" in out:
        out["w_gate_up"] = jnp.concatenate([out.pop("w_gate"), out.pop("w_up")], axis=-1)
    return out


def _unfuse(layer: Params, config: ModelConfig) -> Params:
    out = dict(layer)
    heads, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    qkv = out.pop("wqkv").reshape(-1, heads + 2 * kv, hd)
    out["wq"], out["wk"], out["wv"] = jnp.split(qkv, [heads, heads + kv], axis=-2)
    out["wo"] = out.pop("wo").reshape(heads, hd, -1)
    if "w_gate_up" in out:
        out["w_gate"], out["w_up"] = jnp.split(out.pop("w_gate_up"), 2, axis=-1)
    return out


def _is_unstacked(params: Params) -> bool:
    return isinstance(params["layers"], (list, tuple))


def unstack_layers(params: Params) -> Params:
    """The unstacked CPU decode layout of a stacked weight tree (identity if already unstacked)."""
    if _is_unstacked(params):
        return params
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    per_layer = [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)]
    out = {**params, "layers": tuple(_fuse(layer) for layer in per_layer)}
    if "lm_head" not in out:
        out["lm_head"] = jnp.asarray(params["embed"].T)
    return out


def _packed_for_kernel(params: Params) -> Params:
    """Projections and head packed for the CPU kernel, where it runs for their dtype (else unchanged)."""
    dtype = params["embed"].dtype
    coded = dtype == jnp.float32 and cpu_kernel.coded_available()

    def pack(w):
        if isinstance(w, jax.Array) and w.ndim == 2 and w.dtype == dtype:
            return (coded and CodedWeight.encode(w)) or cpu_kernel.PackedWeight.pack(w)
        return w

    if not cpu_kernel.available(dtype):
        return params
    layers = tuple({k: pack(v) if k in FUSED_PROJECTIONS else v for k, v in layer.items()}
                   for layer in params["layers"])
    return {**params, "layers": layers, "lm_head": pack(params["lm_head"])}


def _unpacked(params: Params) -> Params:
    kinds = (cpu_kernel.PackedWeight, CodedWeight)
    return jax.tree.map(lambda w: w.unpack() if isinstance(w, kinds) else w, params,
                        is_leaf=lambda x: isinstance(x, kinds))


def stack_layers(params: Params, config: ModelConfig) -> Params:
    """The stacked storage layout of `param_specs(config)` (identity if already stacked)."""
    if not _is_unstacked(params):
        return params
    params = _unpacked(params)
    if any(
        isinstance(w, Int8Weight)
        for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
    ):
        raise ValueError("an int8 weight copy has no stacked float layout; quantise a stacked model instead")
    layers = [_unfuse(layer, config) for layer in params["layers"]]
    out = {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    if config.tie_word_embeddings and not config.head_vocab_size:
        out.pop("lm_head", None)
    return out


def with_layout(params: Params, config: ModelConfig, layout: str | Layout) -> tuple[Params, Layout]:
    """`params` (stacked or unstacked float weights) in `layout`, and the resolved Layout."""
    layout = resolve(layout)
    if layout.int8:
        return quantize_params(params), layout
    if layout.stacked:
        return stack_layers(params, config), layout
    return _packed_for_kernel(unstack_layers(params)), layout


def quantize_params(params: Params) -> Params:
    """The int8 layout: every fused projection and the head as an `Int8Weight` (in-major), packed
    for our CPU kernel where it runs (`cpu_kernel.available(int8)`)."""
    params = _unpacked(unstack_layers(params))
    packed = cpu_kernel.available(jnp.int8)

    def quantize(w):
        w = Int8Weight.quantize(w, in_dims=1)
        return w.packed() if packed else w

    layers = tuple({k: quantize(v) if k in FUSED_PROJECTIONS else v for k, v in layer.items()}
                   for layer in params["layers"])
    return {**params, "layers": layers, "lm_head": quantize(params["lm_head"])}


def check_params(params: Params, config: ModelConfig, layout: Layout) -> None:
    """Fail with a clear message when a weight tree does not have the layout it claims."""
    if layout.stacked:
        want = jax.tree.structure(param_specs(config), is_leaf=lambda x: hasattr(x, "axes"))
        have = jax.tree.structure(params)
        if want != have:
            raise ValueError(
                f"weights are not in the stacked layout of this config: expected {want}, got {have}"
            )
        return
    if not _is_unstacked(params) or len(params["layers"]) != config.num_layers:
        raise ValueError(f"weights are not in the {layout.name} layout: expected a tuple of "
                         f"{config.num_layers} per-layer trees")
    layer = params["layers"][0]
    gated = "w_gate_up" if config.mlp == "gated" else "w_up"
    missing = [k for k in ("wqkv", "wo", gated, "w_down") if k not in layer] + \
        ([] if "lm_head" in params else ["lm_head"])
    if missing:
        raise ValueError(f"weights are not in the {layout.name} layout: missing {missing}")
    if isinstance(layer["wqkv"], Int8Weight) != layout.int8:
        raise ValueError(f"weights are not in the {layout.name} layout: int8 weights "
                         f"{'expected' if layout.int8 else 'not expected'}")


def quantize_int8(model: Any) -> Any:
    """An int8 weight copy of `model` (a `Model`): the int8 layout of its weights."""
    return model.with_layout(INT8)
