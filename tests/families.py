"""Tiny random model families for tests: drafts are layer-prefixes of the target, so they agree
with it often enough that acceptances, rejections, bonus tokens and overshoot all happen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.models import Model, init_params
from hsd_jax.models.config import ModelConfig


def tiny_config(vocab: int = 32, layers: int = 4, hidden: int = 32, **overrides) -> ModelConfig:
    fields = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
                  max_position_embeddings=512)
    fields.update(overrides)
    return ModelConfig(**fields)


def layer_prefix(model: Model, layers: int) -> Model:
    """A draft made of the target's embedding, first `layers` blocks and head."""
    params = dict(model.params)
    params["layers"] = jax.tree.map(lambda x: x[:layers], model.params["layers"])
    config = ModelConfig(**{**model.config.__dict__, "num_layers": layers})
    return Model(params, config)


def gguf_quantized(model: Model) -> Model:
    """`model` (stacked) with the weights a llama.cpp GGUF of it holds, dequantized to float32 as a
    GGUF's converter does: every projection Q4_1 and the embedding (the tied head) Q8_0, in blocks
    of 32 along each input axis. Its float32 weights are exactly `models.codes.CodedWeight`s."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from hsd_jax.models.layouts import FUSED_PROJECTIONS, stack_layers, unstack_layers

    def blocks(w, kind):  # w in-major [K, N]: a GGUF's rows are our columns
        rows = np.ascontiguousarray(np.asarray(w, np.float32).T)
        return jnp.asarray(dequantize(quantize(rows, kind), kind).reshape(rows.shape).T)

    params = unstack_layers(model.params)
    layers = tuple({k: blocks(v, GGMLQuantizationType.Q4_1) if k in FUSED_PROJECTIONS else v
                    for k, v in layer.items()} for layer in params["layers"])
    embed = blocks(params["embed"].T, GGMLQuantizationType.Q8_0).T
    params = {**params, "layers": layers, "embed": embed, "lm_head": embed.T}
    return model.replace(params=stack_layers(params, model.config))


def family(vocab: int = 32, seed: int = 0, layers: int = 4, later_scale: float = 0.35) -> list[Model]:
    """[1-layer draft, 2-layer draft, 3-layer draft, target]; later layers are damped so that each
    prefix predicts the target well but not perfectly."""
    config = tiny_config(vocab=vocab, layers=layers)
    params = init_params(config, jax.random.PRNGKey(seed), scale=0.5)
    damp = jnp.asarray([1.0] + [later_scale] * (layers - 1))
    for name in ("wo", "w_down"):
        weight = params["layers"][name]
        params["layers"][name] = weight * damp.reshape(-1, *([1] * (weight.ndim - 1)))
    target = Model(params, config)
    return [layer_prefix(target, n) for n in range(1, layers)] + [target]


# The 32-token family that test_hsd and test_stream decode (`small_family`), its new-token budget,
# and three right-padded prompts: a repetitive one (n-gram drafts hit), a
# short one and a single token.
SMALL_VOCAB, NEW = 32, 20
PROMPTS = np.array([[1, 2, 3, 4, 1, 2, 3, 9], [5, 6, 5, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([8, 4, 1], np.int32)
