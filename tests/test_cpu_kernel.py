"""The CPU kernel (`models.cpu_kernel`), float32, bfloat16 and int8: its products against exact
arithmetic on the same values, a row's result independent of the other rows, the packed layout
inside a model's weights, and XLA's own dots where the kernel is switched off."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import family, gguf_quantized

from hsd_jax.models import cpu_kernel, quantize_int8
from hsd_jax.models.codes import CodedWeight, coded_matmul
from hsd_jax.models.cpu_kernel import PackedWeight, packed_int8_matmul, packed_matmul
from hsd_jax.models.quantize import Int8Weight, int8_matmul

DTYPES = [jnp.float32, jnp.bfloat16]
GROUPS = {np.dtype(jnp.float32): 1, np.dtype(jnp.bfloat16): 2, np.dtype(jnp.int8): 4}


def needs_kernel(dtype):
    return pytest.mark.skipif(not cpu_kernel.available(dtype),
                              reason=f"no {np.dtype(dtype)} CPU kernel here: {cpu_kernel.build_error()}")


@pytest.mark.parametrize("dtype", [*DTYPES, jnp.int8])
@pytest.mark.parametrize("k,n", [(576, 960), (577, 50), (64, 16), (3, 33)])
def test_packing_round_trips(k, n, dtype):
    w = jnp.asarray(np.random.default_rng(k).standard_normal((k, n)) * 50, dtype)
    packed = PackedWeight.pack(w)
    group = GROUPS[np.dtype(dtype)]
    assert packed.shape == (k, n)
    assert packed.data.shape == (-(-n // 16), -(-k // group), 16 * group)
    assert packed.data.dtype == dtype
    np.testing.assert_array_equal(np.asarray(packed.unpack()), np.asarray(w))


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=needs_kernel(d)) for d in DTYPES])
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (2, 577, 50), (3, 64, 48), (8, 1536, 576),
                                   (16, 96, 3072), (37, 64, 40), (5, 50, 33), (2, 31, 17)])
def test_products_match_exact_arithmetic_and_rows_stand_alone(m, k, n, dtype):
    rng = np.random.default_rng(m * k)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    packed = PackedWeight.pack(w)
    got = np.asarray(jax.jit(packed_matmul)(x, packed))
    exact = np.asarray(x.astype(dtype), np.float64) @ np.asarray(w, np.float64)
    # float32 accumulation of products exact in float32 (bf16 x bf16) or rounded once (float32 FMA):
    # an error of a few float32 ulps of the sum's terms
    magnitude = np.abs(np.asarray(x.astype(dtype), np.float64)) @ np.abs(np.asarray(w, np.float64))
    bound = 2 * k * 2.0**-24 * magnitude  # float32 summation of k terms: k unit roundoffs
    assert got.shape == (m, n) and np.all(np.abs(got - exact) <= bound + 1e-30)
    # every row alone gives bit for bit what it gives inside the batch (a one-token step and a
    # k-token check agree on a row)
    for row in {0, m // 2, m - 1}:
        alone = np.asarray(jax.jit(packed_matmul)(x[row:row + 1], packed))
        np.testing.assert_array_equal(alone[0], got[row])


@needs_kernel(jnp.bfloat16)
@pytest.mark.parametrize("k", [1, 17, 31, 32, 50, 577])
def test_bf16_kernel_rounds_its_float32_input_as_xlas_convert(k):
    """Against an identity weight each output is the input rounded to bfloat16: nearest, ties to
    even (1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6), on both sides of zero, for every K tail."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((3, k)).astype(np.float32) * np.float32(2.0) ** rng.integers(-20, 20, (3, k))
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0 * (1 + 2**-8), 65504.5], np.float32)
    x[0, :min(k, ties.size)] = ties[:k]
    packed = PackedWeight.pack(jnp.eye(k, dtype=jnp.bfloat16))
    got = np.asarray(jax.jit(packed_matmul)(jnp.asarray(x), packed))
    np.testing.assert_array_equal(got, np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)))


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=needs_kernel(d)) for d in DTYPES])
def test_every_row_count_runs_its_tiles_and_matches(dtype):
    """m = 1..17 over 17 column blocks: every size of row group (one group of up to 8 rows, two up
    to 16, three at 17), each in its wide column tiles and the narrower ones of a chunk's
    remainder; every row alone equals its row in the batch."""
    rng = np.random.default_rng(5)
    k, n = 96, 17 * 16
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    packed = PackedWeight.pack(w)
    matmul = jax.jit(packed_matmul)
    x = jnp.asarray(rng.standard_normal((17, k)), jnp.float32)
    xd = np.asarray(x.astype(dtype), np.float64)
    exact, magnitude = xd @ np.asarray(w, np.float64), np.abs(xd) @ np.abs(np.asarray(w, np.float64))
    for m in range(1, 18):
        got = np.asarray(matmul(x[:m], packed))
        assert np.all(np.abs(got - exact[:m]) <= 2 * k * 2.0**-24 * magnitude[:m]), m
        for row in range(m):
            np.testing.assert_array_equal(np.asarray(matmul(x[row:row + 1], packed))[0], got[row])


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=needs_kernel(d)) for d in DTYPES])
def test_a_model_runs_packed_on_the_cpu_and_converts_back(dtype):
    target = family(vocab=48, seed=3)[-1]
    cast = lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x  # noqa: E731
    model = target.replace(params=jax.tree.map(cast, target.params))
    unstacked = model.with_layout("unstacked")
    assert isinstance(unstacked.params["layers"][0]["wqkv"], PackedWeight)
    assert isinstance(unstacked.params["lm_head"], PackedWeight)
    assert unstacked.num_params == model.with_layout("stacked").num_params
    # back to the stored layout, and on to int8: the same weights
    restacked = unstacked.with_layout("stacked")
    for a, b in zip(jax.tree.leaves(restacked.params), jax.tree.leaves(model.with_layout("stacked").params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert quantize_int8(unstacked).layout.int8
    # the packed step's logits are the stacked (XLA) step's up to rounding (bf16: of the activations)
    tokens = jnp.asarray([[1, 2, 3]])
    packed_logits, _ = unstacked.step(tokens, unstacked.init_cache(1, 8))
    xla_logits, _ = restacked.step(tokens, restacked.init_cache(1, 8))
    tolerance = dict(atol=0.1, rtol=0.05) if dtype == jnp.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(packed_logits), np.asarray(xla_logits), **tolerance)


needs_codes = pytest.mark.skipif(not cpu_kernel.coded_available() or not cpu_kernel.available(jnp.float32),
                                 reason=f"no block-code CPU kernel here: {cpu_kernel.build_error()}")


def _gguf_weight(k: int, n: int, bits: int, seed: int) -> np.ndarray:
    """A float32 [K, N] weight as a GGUF holds it: Q4_1 (4 bits) or Q8_0 (8) blocks of 32 along K,
    dequantized by the gguf package."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType.Q4_1 if bits == 4 else GGMLQuantizationType.Q8_0
    rows = (np.random.default_rng(seed).standard_normal((n, k)) * 0.1).astype(np.float32)
    return np.ascontiguousarray(dequantize(quantize(rows, kind), kind).reshape(n, k).T)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,n", [(576, 960), (64, 50), (32, 16), (1536, 40)])
def test_block_codes_reproduce_gguf_weights_bit_for_bit(k, n, bits):
    w = _gguf_weight(k, n, bits, seed=k + n)
    coded = CodedWeight.encode(w)
    assert coded is not None and coded.bits == bits and coded.shape == (k, n)
    assert coded.data.shape == (-(-n // 16), k // 32, 64 + 16 * 32 * bits // 8)
    np.testing.assert_array_equal(np.asarray(coded.unpack()).view(np.uint32), w.view(np.uint32))


def test_block_codes_cover_constant_blocks_and_float16_denormal_scales():
    w = _gguf_weight(64, 5, 4, seed=3)  # N < 16
    w[:32, 0] = 0.0  # an all-zero block
    w[32:, 1] = np.float32(0.25)  # a constant one
    d, m = np.float16(2.0**-20), np.float16(0.01)  # d a float16 denormal
    w[:32, 2] = np.float32(d) * (np.arange(32) % 16).astype(np.float32) + np.float32(m)
    coded = CodedWeight.encode(w)
    assert coded is not None and coded.bits == 4
    np.testing.assert_array_equal(np.asarray(coded.unpack()).view(np.uint32), w.view(np.uint32))
    if cpu_kernel.coded_available() and cpu_kernel.available(jnp.float32):
        x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 64)), jnp.float32)
        got = np.asarray(jax.jit(coded_matmul)(x, coded))
        want = np.asarray(jax.jit(packed_matmul)(x, PackedWeight.pack(jnp.asarray(w))))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_block_codes_refuse_what_they_cannot_reproduce():
    rng = np.random.default_rng(0)
    for bad in (np.nan, np.inf, -0.0, 1e5):  # not finite; a negative zero; beyond float16 scales
        w = _gguf_weight(64, 32, 4, seed=1)
        w[3, 4] = bad
        w[:, 5] = 1e5 if bad == 1e5 else w[:, 5]
        assert CodedWeight.encode(w) is None, bad
    assert CodedWeight.encode(rng.standard_normal((64, 32)).astype(np.float32)) is None  # trained weights
    assert CodedWeight.encode(_gguf_weight(64, 32, 4, seed=1)[:48]) is None  # K not a multiple of 32
    assert CodedWeight.encode(_gguf_weight(64, 32, 4, seed=1).astype(np.float64)) is None
    for bits in (4, 8):
        w = _gguf_weight(64, 32, bits, seed=2)
        w[5, 7] = np.nextafter(w[5, 7], np.float32(np.inf))  # one value one ulp off its block
        coded = CodedWeight.encode(w)
        # whatever is returned must reproduce every value; a 4-bit block off by an ulp has no codes
        assert coded is None or np.array_equal(np.asarray(coded.unpack()).view(np.uint32), w.view(np.uint32))
        if bits == 4:
            assert coded is None


@needs_codes
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (2, 64, 50), (3, 64, 5), (3, 576, 960), (4, 64, 40),
                                   (5, 1536, 48), (7, 128, 64), (8, 32, 33), (9, 96, 16), (16, 96, 3072),
                                   (19, 32, 17)])
def test_block_code_products_equal_the_float32_kernel_bit_for_bit(m, k, n, bits):
    """The kernel decodes each block to the stored float32 values and adds the products in the
    float32 kernel's order: the same bits, and every row alone as inside the batch."""
    w = _gguf_weight(k, n, bits, seed=m * k)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 1e-41, -3e-39]  # zeros and denormals (XLA runs with denormals as zero)
    x = jnp.asarray(x)
    coded, plain = CodedWeight.encode(w), PackedWeight.pack(jnp.asarray(w))
    got = np.asarray(jax.jit(coded_matmul)(x, coded))
    want = np.asarray(jax.jit(packed_matmul)(x, plain))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    for row in range(m):
        alone = np.asarray(jax.jit(coded_matmul)(x[row:row + 1], coded))
        np.testing.assert_array_equal(alone[0].view(np.uint32), got[row].view(np.uint32))


@needs_codes
def test_block_code_product_of_no_rows_is_empty():
    coded = CodedWeight.encode(_gguf_weight(64, 40, 4, seed=0))
    got = jax.jit(coded_matmul)(jnp.zeros((0, 64), jnp.float32), coded)
    assert got.shape == (0, 40)


@needs_codes
def test_a_gguf_model_runs_on_block_codes_with_the_float32_kernels_logits(monkeypatch):
    """A model whose float32 weights are a GGUF's Q4_1 / Q8_0 blocks keeps them as codes on CPU
    (projections 4 bits, the head 8), computes the logits of the plain float32 kernel bit for bit, a
    k-token pass what k one-token steps do, and converts back to the same weights."""
    model = gguf_quantized(family(vocab=48, seed=3)[-1])
    coded = model.with_layout("unstacked")
    assert all(isinstance(layer[name], CodedWeight) and layer[name].bits == 4
               for layer in coded.params["layers"] for name in ("wqkv", "wo", "w_gate_up", "w_down"))
    assert isinstance(coded.params["lm_head"], CodedWeight) and coded.params["lm_head"].bits == 8
    assert coded.num_params == model.num_params
    for a, b in zip(jax.tree.leaves(coded.with_layout("stacked").params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    monkeypatch.setenv("HSD_JAX_BLOCK_CODES", "0")
    plain = model.with_layout("unstacked")
    assert isinstance(plain.params["lm_head"], PackedWeight)
    tokens = jnp.asarray([[1, 2, 3, 4, 5]])
    logits, _ = coded.step(tokens, coded.init_cache(1, 8))
    plain_logits, _ = plain.step(tokens, plain.init_cache(1, 8))
    np.testing.assert_array_equal(np.asarray(logits).view(np.uint32),
                                  np.asarray(plain_logits).view(np.uint32))
    cache, steps = coded.init_cache(1, 8), []
    for t in range(tokens.shape[1]):
        step, cache = coded.step(tokens[:, t:t + 1], cache)
        steps.append(step)
    stepped = np.asarray(jnp.concatenate(steps, axis=1))
    np.testing.assert_array_equal(stepped.view(np.uint32), np.asarray(logits).view(np.uint32))


def _int8_reference(x: np.ndarray, w: Int8Weight) -> np.ndarray:
    """The int8 product in numpy: x quantised row by row (float32 absmax / 127, round half to even,
    clipped), the integer sums exact, then rescaled in float32 as the kernel documents."""
    x = np.asarray(x, np.float32)
    absmax = np.max(np.abs(x), axis=-1, keepdims=True)
    scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.round(x / scale), -127, 127).astype(np.int64)
    sums = q @ np.asarray(w.q, np.int64)
    return (sums.astype(np.float32) * scale) * np.asarray(w.scale, np.float32)


needs_int8 = needs_kernel(jnp.int8)


@needs_int8
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (2, 577, 50), (3, 5, 17), (7, 1536, 576),
                                   (16, 96, 3072), (17, 64, 40), (1, 576, 8192)])
def test_int8_products_are_exact_integer_sums_and_rows_stand_alone(m, k, n):
    rng = np.random.default_rng(m * k + n)
    w = Int8Weight.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), in_dims=1)
    x = rng.standard_normal((m, k)).astype(np.float32) * 3
    x[0, : k // 2] = 0
    packed = w.packed()
    matmul = jax.jit(int8_matmul)
    got = np.asarray(matmul(jnp.asarray(x), packed))
    np.testing.assert_array_equal(got, _int8_reference(x, w))
    # XLA's int8 path quantises the same way; its float epilogue may round a last bit differently
    np.testing.assert_allclose(got, np.asarray(matmul(jnp.asarray(x), w)), rtol=1e-6, atol=1e-6)
    for row in {0, m // 2, m - 1}:
        np.testing.assert_array_equal(np.asarray(matmul(jnp.asarray(x[row:row + 1]), packed))[0], got[row])


@needs_int8
def test_int8_quantisation_rounds_ties_to_even_on_both_signs():
    """A row whose absmax is 127 has scale 1, so x itself is the quantised value: ties at +-0.5,
    +-1.5, +-2.5 and -126.5 must round to 0, +-2, +-2 and -126 (half to even), on either sign."""
    ties = np.asarray([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -126.5], np.float32)
    k = len(ties)
    rng = np.random.default_rng(3)
    w = Int8Weight.quantize(jnp.asarray(rng.standard_normal((k, 20)), jnp.float32), in_dims=1)
    identity = Int8Weight(q=jnp.eye(k, dtype=jnp.int8), scale=jnp.ones((k,), jnp.float32), in_dims=1)
    # against the identity weight the product is the quantised row itself
    quantised = np.asarray(jax.jit(int8_matmul)(jnp.asarray(ties[None]), identity.packed()))[0]
    np.testing.assert_array_equal(quantised, [127, 0, 2, 2, 0, -2, -2, 3, -126])
    got = np.asarray(jax.jit(int8_matmul)(jnp.asarray(ties[None]), w.packed()))
    np.testing.assert_array_equal(got, _int8_reference(ties[None], w))


@needs_int8
def test_int8_rows_of_zeros_and_every_row_tile():
    rng = np.random.default_rng(11)
    w = Int8Weight.quantize(jnp.asarray(rng.standard_normal((96, 17 * 16 + 3)), jnp.float32), in_dims=1)
    packed = w.packed()
    x = rng.standard_normal((17, 96)).astype(np.float32)
    x[3] = 0
    matmul = jax.jit(lambda x, w: packed_int8_matmul(x, w.q, w.scale))
    want = _int8_reference(x, w)
    for m in range(1, 18):
        np.testing.assert_array_equal(np.asarray(matmul(jnp.asarray(x[:m]), packed)), want[:m])
    assert not want[3].any()


@needs_int8
def test_an_int8_copy_packs_for_the_kernel_and_converts_back():
    target = family(vocab=48, seed=3)[-1]
    int8 = quantize_int8(target.with_layout("unstacked"))
    assert isinstance(int8.params["layers"][0]["wqkv"].q, PackedWeight)
    assert isinstance(int8.params["lm_head"].q, PackedWeight)
    assert int8.num_params == target.num_params
    xla = int8.replace(params=jax.tree.map(cpu_kernel.unpacked, int8.params,
                                           is_leaf=lambda x: isinstance(x, PackedWeight)))
    assert isinstance(xla.params["lm_head"].q, jax.Array)
    tokens = jnp.asarray([[1, 2, 3, 4]])
    packed_logits, _ = int8.step(tokens, int8.init_cache(1, 8))
    xla_logits, _ = xla.step(tokens, xla.init_cache(1, 8))
    np.testing.assert_allclose(np.asarray(packed_logits), np.asarray(xla_logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target,w,scale,message", [
    ("hsd_f32_matmul", np.zeros((2, 4, 16), np.float32), None, "hsd f32 matmul: x must be [M, K]"),
    ("hsd_bf16_matmul", np.zeros((2, 4, 32), jnp.bfloat16), None, "hsd bf16 matmul: x must be [M, K]"),
    ("hsd_s8_matmul", np.zeros((2, 2, 64), np.int8), np.ones(40, np.float32), "hsd int8 matmul: x must be"),
    ("hsd_s8_matmul", np.zeros((2, 1, 64), np.int8), np.ones(32, np.float32), "hsd int8 matmul: x must be"),
])
def test_a_product_of_the_wrong_shapes_is_refused(target, w, scale, message):
    if not cpu_kernel.available(w.dtype):
        pytest.skip(f"no {w.dtype} CPU kernel here: {cpu_kernel.build_error()}")
    x = jnp.ones((3, 5), jnp.float32)  # K = 5 against K = 4, 7-8, 5-8 with 40 scales for N <= 32, 1-4
    operands = (x, jnp.asarray(w)) + (() if scale is None else (jnp.asarray(scale),))
    result = jax.ShapeDtypeStruct((3, 32), jnp.float32)
    with pytest.raises(Exception, match=re.escape(message)):
        jax.block_until_ready(jax.ffi.ffi_call(target, result)(*operands))


@needs_codes
@pytest.mark.parametrize("x_shape,data_shape,bits", [
    ((3, 64), (2, 2, 320), 8),  # 4-bit records called as 8-bit
    ((3, 48), (2, 1, 320), 4),  # K = 48 against one group of 32
    ((3, 64), (2, 2, 320), 5),
])
def test_a_block_code_product_of_the_wrong_shapes_is_refused(x_shape, data_shape, bits):
    call = jax.ffi.ffi_call("hsd_coded_matmul", jax.ShapeDtypeStruct((3, 32), jnp.float32))
    with pytest.raises(Exception, match=re.escape("hsd coded matmul: x must be [M, 32 G]")):
        jax.block_until_ready(call(jnp.ones(x_shape, jnp.float32), jnp.zeros(data_shape, jnp.uint8),
                                   bits=np.int64(bits)))


def test_switched_off_the_kernel_leaves_xla_dots():
    code = "\n".join([
        "import jax, jax.numpy as jnp",
        "from families import family",
        "from hsd_jax.models import cpu_kernel",
        "m = family(vocab=48, seed=3)[-1]",
        "cast = lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x",
        "m = m.replace(params=jax.tree.map(cast, m.params)).with_layout('unstacked')",
        "f32 = family(vocab=48, seed=3)[-1].with_layout('unstacked')",
        "from hsd_jax.models import quantize_int8",
        "q = quantize_int8(f32).params['lm_head'].q",
        "print(cpu_kernel.available(jnp.bfloat16), cpu_kernel.available(jnp.float32),",
        "      cpu_kernel.available(jnp.int8), cpu_kernel.build_error(), type(m.params['lm_head']).__name__,",
        "      type(f32.params['lm_head']).__name__, type(q).__name__)"])
    path = os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, HSD_JAX_CPU_KERNEL="0", PYTHONPATH=path)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "False", "False", "HSD_JAX_CPU_KERNEL=0", "ArrayImpl", "ArrayImpl",
                                  "ArrayImpl"]


@pytest.fixture
def fresh_choice():
    """cpu_kernel's choice of build made again inside the test, and again after it (with the
    errors it had)."""
    errors = list(cpu_kernel._errors)
    cpu_kernel._instruction_set.cache_clear()
    yield
    cpu_kernel._instruction_set.cache_clear()
    cpu_kernel._errors[:] = errors


AVX512 = {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx2", "fma", "f16c"}


@pytest.mark.parametrize("flags,env,expected,message", [
    (AVX512, "1", "avx512", None),
    ({"avx2", "fma", "f16c", "sse4_2"}, "1", "avx2", None),  # Zen 2 and 3, Intel client cores
    (AVX512 - {"avx512_bf16"}, "1", "avx2", None),  # AVX-512 without BF16 (Ice Lake): all on AVX2
    (AVX512, "avx2", "avx2", None),
    (AVX512, " AVX2 ", "avx2", None),
    ({"avx2", "fma", "f16c"}, "avx512", None, "lacks avx512_bf16, avx512_vnni, avx512bw, avx512f"),
    ({"avx", "sse4_2"}, "1", None, "lacks avx2, avx512_bf16, avx512_vnni, avx512bw, avx512f, f16c, fma"),
    ({"avx2", "f16c"}, "1", None, "lacks avx512_bf16, avx512_vnni, avx512bw, avx512f, fma"),  # no FMA
    ({"avx2", "fma"}, "1", None, "lacks avx512_bf16, avx512_vnni, avx512bw, avx512f, f16c"),  # no F16C
    (AVX512, "0", None, "HSD_JAX_CPU_KERNEL=0"),
    (AVX512, "fast", None, "HSD_JAX_CPU_KERNEL='fast' is not one of 0, 1, avx512, avx2"),
])
def test_the_build_follows_the_cpus_instruction_set(monkeypatch, fresh_choice, flags, env, expected, message):
    monkeypatch.setattr(cpu_kernel, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setenv("HSD_JAX_CPU_KERNEL", env)
    assert cpu_kernel.instruction_set() == expected
    if message is not None:
        assert message in cpu_kernel.build_error()


def test_the_build_in_use_is_the_one_asked_for():
    asked = os.environ.get("HSD_JAX_CPU_KERNEL", "1")
    if asked not in cpu_kernel.BUILDS:
        pytest.skip("HSD_JAX_CPU_KERNEL does not name a build")
    assert cpu_kernel.instruction_set() == asked


@pytest.mark.skipif(cpu_kernel.instruction_set() != "avx512"
                    or not {"avx2", "fma", "f16c"} <= cpu_kernel._cpu_flags(),
                    reason="this machine runs this file on the AVX2 build already (or cannot run it)")
def test_the_avx2_build_passes_this_file_on_an_avx512_machine():
    env = dict(os.environ, HSD_JAX_CPU_KERNEL="avx2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "not avx2_build_passes and not follows_the_cpus"],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout.splitlines()[-1], run.stdout[-500:]


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=needs_kernel(d)) for d in DTYPES])
def test_calls_from_several_threads_at_once_give_the_same_products(dtype):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    packed = PackedWeight.pack(jnp.asarray(rng.standard_normal((576, 960)), dtype))
    xs = [jnp.asarray(rng.standard_normal((m, 576)), jnp.float32) for m in (1, 3, 8, 16) * 4]
    matmul = jax.jit(packed_matmul)
    alone = [np.asarray(matmul(x, packed)) for x in xs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda x: np.asarray(matmul(x, packed)), xs))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


needs_rows = pytest.mark.skipif(not cpu_kernel.rows_available(),
                                reason=f"no CPU attention/row-sum kernel here: {cpu_kernel.build_error()}")


def _attention_in_float64(q, k, v, mask):
    """softmax(q k / sqrt(d)) v over the unmasked positions, exactly enough (float64): [B, T, H, D]."""
    q, k, v, mask = (np.asarray(a, np.float64) for a in (q, k, v, mask))
    k, v = (np.repeat(a, q.shape[2] // a.shape[2], axis=2) for a in (k, v))
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None] > 0, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", weights / weights.sum(-1, keepdims=True), v)


@needs_rows
@pytest.mark.parametrize("batch,steps,heads,kv_heads,dim,size,window", [
    (1, 1, 9, 3, 64, 256, 0), (2, 5, 4, 2, 16, 40, 0), (1, 16, 9, 3, 64, 256, 0), (2, 3, 6, 3, 12, 33, 0),
    (2, 7, 4, 4, 100, 50, 6), (1, 3, 2, 1, 256, 20, 0), (1, 4, 4, 2, 128, 40, 0), (1, 2, 8, 2, 64, 70, 0),
    (2, 2, 2, 2, 128, 30, 0), (1, 2, 10, 2, 64, 30, 0), (1, 3, 2, 2, 64, 45, 0), (2, 4, 4, 2, 64, 37, 0),
    (1, 5, 6, 2, 64, 50, 7)])
def test_cached_attention_is_near_exact_rows_alone(batch, steps, heads, kv_heads, dim, size, window):
    from hsd_jax.models.ops import attention

    rng = np.random.default_rng(size * steps + dim)
    layers = 3
    q = jnp.asarray(rng.standard_normal((batch, steps, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(3 * rng.standard_normal((layers, batch, size, kv_heads, dim)), jnp.float32)
            for _ in range(2))
    positions = jnp.asarray(rng.integers(0, size - steps, batch))[:, None] + jnp.arange(steps)[None]
    keys = jnp.arange(size)[None, None, :]
    mask = keys <= positions[:, :, None]
    if window:
        mask &= positions[:, :, None] - keys < window
    run = jax.jit(cpu_kernel.cached_attention, static_argnums=3)
    for layer in range(layers):
        got = np.asarray(run(q, k, v, layer, mask))
        exact = _attention_in_float64(q, k[layer], v[layer], mask)
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
        # as close as XLA's own (which is up to ~1.2e-5 off exact on these inputs)
        xla_error = np.abs(np.asarray(attention(q, k[layer], v[layer], mask)) - exact).max()
        assert np.abs(got - exact).max() <= max(xla_error, 5e-6)
        for row in {0, steps - 1}:  # a row alone gives bit for bit what it gives among the others
            alone = np.asarray(run(q[:, row:row + 1], k, v, layer, mask[:, row:row + 1]))
            np.testing.assert_array_equal(alone[:, 0], got[:, row])


@needs_rows
def test_attention_on_one_thread_reuses_its_scratch_and_gives_the_same():
    """With one kernel thread every task of a call runs on the caller, reusing one scores scratch
    (stale values at other rows' masked positions): the attention test passes there too."""
    env = dict(os.environ, HSD_JAX_KERNEL_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
               "cached_attention_is_near_exact"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-500:]


def test_every_kernel_source_ships_with_the_package():
    tomllib = pytest.importorskip("tomllib")
    root = Path(cpu_kernel.__file__).parents[2]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = setuptools["package-data"]["hsd_jax"]
    kernels = cpu_kernel.KERNELS
    needed = {source for source, _, _ in cpu_kernel.BUILDS.values()} | set(cpu_kernel.SHARED_SOURCES)
    for name in sorted(needed):
        text = (kernels / name).read_text()
        needed |= set(re.findall(r'#include "([^"/]+)"', text))  # our own headers, not XLA's
    for name in sorted(needed):
        assert (kernels / name).is_file(), name
        assert any(fnmatch.fnmatch(f"models/kernels/{name}", g) for g in globs), f"{name} is not package data"
    assert needed - set(cpu_kernel.SHARED_SOURCES) <= {source for source, _, _ in cpu_kernel.BUILDS.values()}


@needs_rows
@pytest.mark.parametrize("width", [576, 64, 37, 5])
def test_row_sums_are_sums_and_rows_stand_alone(width):
    x = jnp.asarray(np.random.default_rng(width).standard_normal((2, 19, width)), jnp.float32)
    got = np.asarray(jax.jit(cpu_kernel.row_sums)(x))
    assert got.shape == (2, 19, 1)
    np.testing.assert_allclose(got[..., 0], np.asarray(x, np.float64).sum(-1), rtol=1e-5, atol=1e-5)
    for row in (0, 7, 18):
        alone = np.asarray(jax.jit(cpu_kernel.row_sums)(x[:, row:row + 1]))
        np.testing.assert_array_equal(alone, got[:, row:row + 1])
    np.testing.assert_array_equal(np.asarray(jax.vmap(cpu_kernel.row_sums)(x)), got)  # vmaps


@needs_rows
@pytest.mark.parametrize("dtype", [pytest.param(d, marks=needs_kernel(d)) for d in [*DTYPES, jnp.int8]])
def test_a_k_token_pass_computes_what_k_one_token_steps_do_bit_for_bit(dtype):
    """The property that makes greedy HSD token-identical to greedy AR in every dtype on this path:
    a row's logits and cache entries do not depend on how many rows the pass holds. int8: the
    int8 copy of a bfloat16 model (its weights packed for the int8 kernel)."""
    target = family(vocab=48, seed=3)[-1]
    weight_dtype = jnp.bfloat16 if dtype == jnp.int8 else dtype
    cast = lambda x: x.astype(weight_dtype) if x.dtype == jnp.float32 else x  # noqa: E731
    model = target.replace(params=jax.tree.map(cast, target.params))
    model = quantize_int8(model) if dtype == jnp.int8 else model.with_layout("unstacked")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 24)), jnp.int32)
    step = jax.jit(lambda m, t, c: m.step(t, c))
    _, cache = step(model, tokens[:, :5], model.init_cache(2, 32))
    passes = {}
    for width in (19, 4, 1):
        logits, c = [], cache
        for start in range(5, 24, width):
            out, c = step(model, tokens[:, start:min(start + width, 24)], c)
            logits.append(out)
        passes[width] = (np.asarray(jnp.concatenate(logits, axis=1)), np.asarray(c.k), np.asarray(c.v))
    for width in (4, 1):
        for a, b in zip(passes[19], passes[width]):
            np.testing.assert_array_equal(a, b)


@needs_rows
def test_embedding_rows_are_the_table_rows_as_float32():
    table = jnp.asarray(np.random.default_rng(1).standard_normal((50, 24)), jnp.bfloat16)
    tokens = jnp.asarray([[0, 7, 49, 7, 3], [1, 2, 3, 4, 5]], jnp.int32)
    got = np.asarray(jax.jit(cpu_kernel.embedding_rows)(table, tokens))
    np.testing.assert_array_equal(got, np.asarray(jnp.take(table, tokens, axis=0).astype(jnp.float32)))
    assert got.dtype == np.float32 and got.shape == (2, 5, 24)


@needs_rows
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 33, 1000, 8193, 49152])
def test_argmax_is_jnp_argmax_on_ties_infinities_and_nans(vocab):
    """The first index of the maximum (a NaN counting as the maximum), as `jnp.argmax`: ties in
    and across 16-lane blocks, the ragged tail, all -inf, +inf, signed zeros and NaN rows."""
    rng = np.random.default_rng(vocab)
    kernel = jax.jit(cpu_kernel.argmax)
    for trial in range(12):
        x = rng.integers(-3, 3, (3, 4, vocab)).astype(np.float32)  # many ties
        if trial % 4 == 1:
            x[0, 1, rng.integers(0, vocab)] = np.nan
            x[1, 2, :] = np.nan
            x[2, 3, 0] = np.inf  # +inf before two NaNs in different 16-wide blocks: the first NaN
            x[2, 3, [min(18, vocab - 1), vocab - 1]] = np.nan
        elif trial % 4 == 2:
            x[0] = -np.inf
            x[1, 0, -1] = np.inf
        elif trial % 4 == 3:
            x = rng.standard_normal((3, 4, vocab)).astype(np.float32)
            x[2, 3] = -0.0
            x[2, 3, vocab // 2] = 0.0
            x[0, 0, -1] = 50.0  # the maximum in the last (possibly partial) block
        got = np.asarray(kernel(jnp.asarray(x)))
        assert got.dtype == np.int32 and got.shape == (3, 4)
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))


@needs_rows
def test_greedy_sampling_takes_the_same_tokens_on_the_kernel():
    from hsd_jax.decoding.sampling import SamplingParams, on_kernel, sample_logits

    logits = jnp.asarray(np.random.default_rng(2).standard_normal((5, 49152)), jnp.float32)
    key = jax.random.PRNGKey(0)
    on, probs_on = jax.jit(lambda x: sample_logits(key, x, SamplingParams(), kernel=True))(logits)
    off, probs_off = sample_logits(key, logits, SamplingParams(), kernel=False)
    np.testing.assert_array_equal(np.asarray(on), np.asarray(off))
    np.testing.assert_array_equal(np.asarray(probs_on), np.asarray(probs_off))
    assert on_kernel([object()]) and not on_kernel([type("Sharded", (), {"sharding": "mesh"})()])


def _softmax64(x: np.ndarray, temperature: float) -> np.ndarray:
    y = x.astype(np.float64) / temperature
    e = np.exp(y - y.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@needs_rows
@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 700, 49152])
def test_softmax_is_as_close_to_exact_as_xlas(vocab):
    """Against float64: within 1e-5 relative (the rounding of x / T and of its distance to the
    maximum, as XLA's), and no further from it than XLA's softmax plus 1e-6; rows stand alone."""
    rng = np.random.default_rng(vocab)
    x = (rng.standard_normal((2, 3, vocab)) * 4).astype(np.float32)
    x[1, 2, 1:: max(vocab // 5, 2)] = -1e30  # masked entries: exactly zero mass
    for temperature in (1.0, 0.7, 2.5):
        got = np.asarray(jax.jit(lambda x, t=temperature: cpu_kernel.softmax(x, t))(jnp.asarray(x)))
        xla = np.asarray(jax.nn.softmax(jnp.asarray(x) / temperature, axis=-1))
        exact = _softmax64(x, temperature)
        assert got.shape == x.shape and got.dtype == np.float32
        err, xla_err = np.abs(got - exact), np.abs(xla - exact)
        assert np.all(err <= 1e-5 * exact + 1e-37), (temperature, float((err / (exact + 1e-37)).max()))
        assert (err / np.maximum(exact, 1e-30)).max() <= (xla_err / np.maximum(exact, 1e-30)).max() + 1e-6
        np.testing.assert_array_equal(got[x == -1e30], 0.0)
        alone = np.asarray(cpu_kernel.softmax(jnp.asarray(x[1, 2:3]), temperature))
        np.testing.assert_array_equal(alone[0], got[1, 2])


@needs_rows
def test_softmax_exponential_is_within_three_ulp_over_the_float32_range():
    """One entry at 0 and 400k between -103 and -17.5: the total is known in float64, so each
    probability is e^x / total; the kernel's error (the attention's exponential, float64 sum,
    reciprocal) stays within 3.5 ulp (XLA's: 2), below float32's normals it gives XLA's answer,
    and NaN and +inf rows come out NaN as in XLA."""
    y = np.linspace(-103.0, -17.5, 400_001).astype(np.float32)
    row = np.concatenate([[0.0], y]).astype(np.float32)[None]
    got = np.asarray(cpu_kernel.softmax(jnp.asarray(row)))[0, 1:].astype(np.float64)
    exact = np.exp(y.astype(np.float64))
    exact /= 1.0 + exact.sum()
    normal = exact > np.finfo(np.float32).tiny
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - exact)[normal] / ulp[normal]) < 3.5
    xla = np.asarray(jax.nn.softmax(jnp.asarray(row), axis=-1))[0, 1:]
    np.testing.assert_array_equal(got[~normal], xla[~normal])  # XLA:CPU flushes denormals to zero
    odd = np.zeros((4, 40), np.float32)
    odd[0, 7], odd[1, 33], odd[2], odd[3, 5] = np.nan, np.inf, -np.inf, 1e38  # 1e38 / 1e-4 overflows
    for temperature in (1.0, 1e-4):
        got = np.asarray(cpu_kernel.softmax(jnp.asarray(odd), temperature))
        xla = np.asarray(jax.nn.softmax(jnp.asarray(odd) / temperature, axis=-1))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(xla))
        np.testing.assert_allclose(got[~np.isnan(got)], xla[~np.isnan(xla)], rtol=1e-6)
    assert np.isnan(got[:4]).all()


@needs_rows
@pytest.mark.parametrize("vocab", [1, 3, 255, 256, 257, 700, 49152])
def test_sample_kernel_inverts_as_the_jax_sampler_does(vocab):
    """From the same two uniforms the kernel's draw is the jnp sampler's (dyadic masses, so every
    partial sum is exact in both; u times the total is rounded to float32 in jnp and not here,
    which could move a draw only within ~1e-7 of a boundary); zero, negative and NaN entries are
    never drawn; a row with no mass gives V - 1 in both; the kernel runs under vmap."""
    from hsd_jax.decoding.sampling import _invert

    rng = np.random.default_rng(vocab)
    mass = rng.integers(0, 64, (300, vocab)).astype(np.float32) / 64
    if vocab > 5:
        mass[:, rng.integers(vocab, size=5)] = 0.0
    mass[::7, 0] = -1e-9
    if vocab > 2:
        mass[::11, 1] = np.nan
    mass[5] = 0.0
    mass[6] = np.nan
    uniforms = rng.random((300, 2)).astype(np.float32)
    uniforms[:20] = [[0.0, 0.0], [0.9999999, 0.9999999]] * 10
    got = np.asarray(jax.jit(cpu_kernel.sample)(jnp.asarray(mass), jnp.asarray(uniforms)))
    want = np.asarray(_invert(jnp.asarray(mass), jnp.asarray(uniforms[:, :1]), jnp.asarray(uniforms[:, 1:])))
    np.testing.assert_array_equal(got, want)
    assert got[5] == got[6] == vocab - 1
    live = (mass > 0).any(axis=1)
    assert live.sum() >= 200
    assert np.all(mass[np.arange(300), got][live] > 0)
    np.testing.assert_array_equal(got[~live], vocab - 1)
    batched = jax.vmap(cpu_kernel.sample)(jnp.asarray(mass[:8, None]), jnp.asarray(uniforms[:8, None]))
    np.testing.assert_array_equal(np.asarray(batched)[:, 0], got[:8])
