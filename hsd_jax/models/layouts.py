"""Weight layouts: how a model's weights are arranged for the backend it runs on."""

from __future__ import annotations

from hsd_jax.models.decoder import Model, Params, unstack_layers
from hsd_jax.models.quantize import Int8Weight

_OUT_MAJOR = ("wqkv_t", "wo_t", "w_gate_up_t", "w_up_t", "w_down_t")


def _quantize_layer(layer: Params) -> Params:
    out = dict(layer)
    for name in _OUT_MAJOR:
        if name in out:
            out[name] = Int8Weight.quantize(out[name].T, in_dims=1)
    return out


def quantize_int8(model: Model) -> Model:
    """An int8 weight copy of `model` (CPU decode layout: per-layer trees and an explicit head)."""
    params = unstack_layers(model.params)
    params = {**params, "layers": tuple(_quantize_layer(layer) for layer in params["layers"]),
              "lm_head": Int8Weight.quantize(params["lm_head"], in_dims=1)}
    params.pop("lm_head_t", None)
    return model.replace(params=params)
