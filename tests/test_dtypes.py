"""Greedy identity in every supported weight dtype and layout: HSD's output is token for token the
target's greedy AR output when every model runs the same kernels (float32 or bfloat16 weights,
float32 accumulation; stacked, unstacked and int8 layouts, int8 also as the target; float32 weights
that are a GGUF's Q4_1 and Q8_0 blocks, run from those codes on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import family, gguf_quantized

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.models import cpu_kernel, quantize_int8
from hsd_jax.models.codes import CodedWeight

VOCAB = 48
PROMPTS = np.array([[1, 2, 3, 4, 1, 2, 3, 9], [5, 6, 5, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([8, 4, 1], np.int32)
NEW = 24
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _family(dtype, layout, gguf=False):
    models = family(vocab=VOCAB, seed=3)
    if gguf:
        models = [gguf_quantized(m) for m in models]
    return [
        m.replace(
            params=jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, m.params)
        ).with_layout(layout)
        for m in models
    ]


def _assert_greedy_hsd_equals_ar(target, chains, label):
    """Every (drafts, buffers) hierarchy over `target` gives its greedy AR tokens, with drafts accepted."""
    reference = ar_generate(target, PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=NEW)
    for drafts, buffers in chains:
        out = hsd_generate(Hierarchy([*drafts, target], buffers, "block"), PROMPTS, LENGTHS,
                           jax.random.PRNGKey(1), max_new_tokens=NEW)
        np.testing.assert_array_equal(out.tokens, reference.tokens, err_msg=f"{label} {buffers}")
        np.testing.assert_array_equal(out.num_tokens, reference.num_tokens)
        assert int(out.stats.accepted.sum()) > 0  # the drafts did draft and were accepted, not bypassed


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_greedy_hsd_equals_greedy_ar(dtype, layout):
    models = _family(DTYPES[dtype], layout)
    target = models[-1]
    assert target.params["embed"].dtype == DTYPES[dtype] and target.layout.kind == layout
    chains = [([models[0]], (4,)), ([models[0], models[2]], (2, 5)),
              ([NGramDrafter(2, VOCAB), models[1]], (3, 4))]
    if layout == "unstacked":
        chains.append(([quantize_int8(models[1])], (3,)))
    _assert_greedy_hsd_equals_ar(target, chains, f"{dtype} {layout}")


@pytest.mark.skipif(not cpu_kernel.coded_available() or not cpu_kernel.rows_available(),
                    reason=f"no block-code CPU kernel here: {cpu_kernel.build_error()}")
def test_greedy_hsd_equals_greedy_ar_on_gguf_block_codes():
    """float32 weights that are Q4_1 / Q8_0 blocks run from their codes (`CodedWeight`) in every
    model of the hierarchy and in AR: the same tokens."""
    models = _family(jnp.float32, "unstacked", gguf=True)
    target = models[-1]
    assert isinstance(target.params["layers"][0]["wqkv"], CodedWeight)
    assert isinstance(target.params["lm_head"], CodedWeight)
    chains = [([models[0]], (4,)), ([models[0], models[2]], (2, 5)), ([quantize_int8(models[1])], (3,))]
    _assert_greedy_hsd_equals_ar(target, chains, "block codes")


def test_bfloat16_weights_give_float32_logits():
    target = _family(jnp.bfloat16, "unstacked")[-1]
    cache = target.init_cache(1, 16)
    logits, cache = target.step(jnp.asarray(PROMPTS[:1, :1]), cache)
    assert logits.dtype == jnp.float32 and cache.k.dtype == target.cache_dtype
    # one row is computed as two on CPU: the same logits as the row inside a two-row batch
    pair, _ = target.step(jnp.asarray(PROMPTS[:2, :1]), target.init_cache(2, 16))
    np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(pair[0]))


@pytest.mark.skipif(not cpu_kernel.available(jnp.int8) or not cpu_kernel.rows_available(),
                    reason=f"no int8 CPU kernel here: {cpu_kernel.build_error()}")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_greedy_hsd_equals_greedy_ar_with_an_int8_target(dtype):
    """An int8 copy as the target (on our int8 kernel, whose rows do not depend on each other):
    every hierarchy under it reproduces its greedy AR output token for token."""
    models = _family(DTYPES[dtype], "unstacked")
    target = quantize_int8(models[-1])
    chains = [([models[0]], (4,)), ([quantize_int8(models[0]), models[1]], (2, 3)),
              ([NGramDrafter(2, VOCAB)], (3,))]
    _assert_greedy_hsd_equals_ar(target, chains, f"int8 target, {dtype}")
