"""Models: config, weight spec, layouts, the decoder, int8 weights and the KV cache."""

from hsd_jax.models.cache import KVCache
from hsd_jax.models.config import ModelConfig, UnsupportedArchitectureError
from hsd_jax.models.decoder import Model, decode_step, forward, hidden_states, logits_from_hidden
from hsd_jax.models.layouts import (
                                   INT8,
                                   LAYOUTS,
                                   STACKED,
                                   UNSTACKED,
                                   Layout,
                                   quantize_int8,
                                   stack_layers,
                                   unstack_layers,
)
from hsd_jax.models.params import (
                                   INTEGER_PARAMS,
                                   Params,
                                   ParamSpec,
                                   abstract_params,
                                   init_params,
                                   param_logical_axes,
                                   param_shapes,
                                   param_specs,
)

__all__ = [
    "INT8",
    "INTEGER_PARAMS",
    "KVCache",
    "LAYOUTS",
    "Layout",
    "Model",
    "ModelConfig",
    "ParamSpec",
    "Params",
    "STACKED",
    "UNSTACKED",
    "UnsupportedArchitectureError",
    "abstract_params",
    "decode_step",
    "forward",
    "hidden_states",
    "init_params",
    "logits_from_hidden",
    "param_logical_axes",
    "param_shapes",
    "param_specs",
    "quantize_int8",
    "stack_layers",
    "unstack_layers",
]
