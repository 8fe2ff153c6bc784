"""float32, bfloat16 and int8 products on XLA:CPU through our own kernel (`kernels/packed_matmul.cc`).

XLA:CPU runs a one-row dot with its own GEMV (a one-row bfloat16 dot converts the whole weight to
float32 first) and a k-row one through a GEMM library that is far from the memory bound at
k <= 16 (../shared/cpu-dots.md), so a k-token check cost 1.8x one token in float32. The kernel
here reads each weight from memory once per call (rows in register tiles of up to 8, further groups
of rows from L2), from a layout packed once at load (`PackedWeight`:
float32 [N/16, K, 16], AVX-512 FMA; bfloat16 [N/16, K/2, 16, 2], the pairs AVX512-BF16's
VDPBF16PS multiplies), and accumulates in float32. int8 weights (`models.quantize.Int8Weight`,
one scale per column) are packed [N/16, K/4, 16, 4] for AVX512-VNNI's VPDPBUSD against x
quantised to int8 row by row, as XLA's int8 path does, with exact int32 sums
(`packed_int8_matmul`): half a bfloat16 weight's bytes. Every output element adds the same
products in the same order whatever the number of rows, so a one-token step and a k-token check
compute a row bit for bit alike. The rest of a layer's row-dependent work runs here too, likewise one row
at a time: attention over the float32 KV cache (`cached_attention`, one layer read in place; XLA
copied and transposed it, ~3 ms a target step), the norms' row sums (`row_sums`), and a bf16
table's embedding rows (`embedding_rows`); and the decoders' passes over the vocabulary: greedy
decoding's argmax (`argmax`), sampling's softmax (`softmax`) and draw (`sample`).

The kernel is built for one of two instruction sets, the first this CPU has: AVX-512
(`kernels/packed_matmul.cc`: F, BW, BF16 and VNNI, as on AMD Zen 4 or Intel Sapphire Rapids), or
AVX2 with FMA (`kernels/packed_matmul_avx2.cc`: the same targets, layouts and contract in 8-lane
registers, for Zen 2 and 3, Intel's client cores and older servers); both also need F16C, and
both include the block-code product (`kernels/coded.h`, 8-lane code). Both give every kernel, and
each is exact in the same sense; float32 sums are ordered differently between the two, so their
results may differ in the last bits (a machine always uses the same one). It is compiled with g++
on first use into a cache directory ($XDG_CACHE_HOME/hsd_jax, else ~/.cache/hsd_jax), keyed by the
sources, the instruction set and jaxlib's version, and registered as XLA FFI targets.
`available(dtype)` is False, and weights keep XLA's own dots, where the CPU has neither
instruction set, no compiler is found, the build fails (`build_error()` says why), the backend is
not the CPU, or HSD_JAX_CPU_KERNEL=0 is set (HSD_JAX_CPU_KERNEL=avx2 takes the AVX2 build on an
AVX-512 CPU too). The kernel's threads are the cores the process may use, or
HSD_JAX_KERNEL_THREADS. Importing this module builds nothing and sets no XLA flag.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import struct

KERNELS = Path(__file__).with_name("kernels")
# instruction set: its source, the CPU flags it needs (/proc/cpuinfo's names) and g++'s flags for it
BUILDS = {
    "avx512": ("packed_matmul.cc", {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "f16c"},
               ["-mavx512f", "-mfma", "-mavx512bf16", "-mavx512bw", "-mavx512vnni", "-mf16c"]),
    "avx2": ("packed_matmul_avx2.cc", {"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c"]),
}
SHARED_SOURCES = ("common.h", "coded.h", "handlers.inc")
# FFI target: the symbol of its handler (each build exports all of them)
TARGETS = {
    "hsd_f32_matmul": "HsdF32Matmul",
    "hsd_bf16_matmul": "HsdBf16Matmul",
    "hsd_s8_matmul": "HsdS8Matmul",
    "hsd_coded_matmul": "HsdCodedMatmul",
    "hsd_attention": "HsdAttention",
    "hsd_row_sums": "HsdRowSums",
    "hsd_embedding_rows": "HsdEmbeddingRows",
    "hsd_argmax": "HsdArgmax",
    "hsd_softmax": "HsdSoftmax",
    "hsd_sample": "HsdSample",
}
ROW_TARGETS = ("hsd_attention", "hsd_row_sums", "hsd_embedding_rows", "hsd_argmax", "hsd_softmax",
               "hsd_sample")
MATMULS = {np.dtype(jnp.float32): "hsd_f32_matmul", np.dtype(jnp.bfloat16): "hsd_bf16_matmul",
           np.dtype(jnp.int8): "hsd_s8_matmul"}
BLOCK = 16  # output columns per packed block (one AVX-512 register of float32)
_errors: list[str] = []


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hsd_jax"


def instruction_set() -> str | None:
    """The build chosen for this CPU: "avx512", "avx2", or None (HSD_JAX_CPU_KERNEL=0 or an unknown
    value, or a CPU with neither; `build_error()` says which). Whether it built and runs:
    `available()`, `rows_available()`."""
    return _instruction_set()


@functools.cache
def _instruction_set() -> str | None:
    choice = os.environ.get("HSD_JAX_CPU_KERNEL", "1").strip().lower()
    if choice == "0":
        _errors.append("HSD_JAX_CPU_KERNEL=0")
        return None
    if choice not in ("1", *BUILDS):
        _errors.append(f"HSD_JAX_CPU_KERNEL={choice!r} is not one of 0, 1, {', '.join(BUILDS)}")
        return None
    flags = _cpu_flags()
    for isa, (_, needs, _) in BUILDS.items():
        if choice in ("1", isa) and needs <= flags:
            return isa
    wanted = BUILDS[choice][1] if choice in BUILDS else set().union(*(b[1] for b in BUILDS.values()))
    _errors.append(f"this CPU lacks {', '.join(sorted(wanted - flags))} (the kernel needs AVX-512 F, BW, "
                   "BF16 and VNNI, or AVX2 with FMA; F16C in both)")
    return None


def _build(isa: str) -> Path:
    """The compiled library for `isa`, built on first use (atomically: a killed build leaves nothing)."""
    source_name, _, isa_flags = BUILDS[isa]
    source = KERNELS / source_name
    text = b"".join((KERNELS / name).read_bytes() for name in (source_name, *SHARED_SOURCES))
    key = hashlib.sha256(text + isa.encode() + jaxlib.__version__.encode()).hexdigest()[:16]
    library = _cache_dir() / f"{source.stem}-{key}.so"
    if library.is_file():
        return library
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        command = [compiler, "-O3", "-std=c++17", *isa_flags, "-pthread", "-fPIC", "-shared", "-w",
                   f"-I{jax.ffi.include_dir()}", str(source), "-o", str(built)]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {run.stderr.strip()[-500:]}")
        os.replace(built, library)
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    isa = _instruction_set()
    if isa is None:
        return None
    try:
        return ctypes.cdll.LoadLibrary(str(_build(isa)))
    except (OSError, RuntimeError) as e:
        _errors.append(str(e))
        return None


@functools.cache
def _register(name: str) -> bool:
    library = _library()
    if library is None:
        return False
    try:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, TARGETS[name])), platform="cpu")
    except (AttributeError, ValueError) as e:
        _errors.append(str(e))
        return False
    return True


def available(dtype) -> bool:
    """Whether weights of `dtype` can run on the kernel here (built and registered on the first call)."""
    name = MATMULS.get(np.dtype(dtype))
    return jax.default_backend() == "cpu" and name is not None and _register(name)


def coded_available() -> bool:
    """Whether block-coded float32 weights (`models.codes.CodedWeight`) can run on the kernel here
    (HSD_JAX_BLOCK_CODES=0 keeps them as plain float32, for comparison)."""
    return (jax.default_backend() == "cpu" and os.environ.get("HSD_JAX_BLOCK_CODES", "1").strip() != "0"
            and _register("hsd_coded_matmul"))


def rows_available() -> bool:
    """Whether attention over a float32 cache, row sums, embedding rows, argmax, softmax and
    sampling draws can run on the kernel here."""
    return jax.default_backend() == "cpu" and all(_register(name) for name in ROW_TARGETS)


def build_error() -> str | None:
    """Why the kernel is not available, once `available()` has said so."""
    return _errors[-1] if _errors else None


def _group(dtype) -> int:
    """Weight rows per packed step: VDPBF16PS multiplies bfloat16 in (k, k+1) pairs, VPDPBUSD int8 in
    quads."""
    return {np.dtype(jnp.bfloat16): 2, np.dtype(jnp.int8): 4}.get(np.dtype(dtype), 1)


@struct.dataclass
class PackedWeight:
    """A float32, bfloat16 or int8 weight [K, N] packed for the kernel: `data` [ceil(N/16), ceil(K/g),
    16 g] (g = 1 for float32, 2 for bfloat16, 4 for int8), each block of 16 output columns one
    contiguous run of steps; zero padding on both axes."""

    data: jax.Array
    in_features: int = struct.field(pytree_node=False)
    out_features: int = struct.field(pytree_node=False)

    @classmethod
    def pack(cls, w: jax.Array) -> PackedWeight:
        k, n = w.shape
        g = _group(w.dtype)
        w = jnp.pad(w, ((0, -k % g), (0, -n % BLOCK)))
        blocks = w.reshape(w.shape[0] // g, g, w.shape[1] // BLOCK, BLOCK).transpose(2, 0, 3, 1)
        data = blocks.reshape(blocks.shape[0], blocks.shape[1], g * BLOCK)
        return cls(data=data, in_features=k, out_features=n)

    @property
    def shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def unpack(self) -> jax.Array:
        blocks, steps, _ = self.data.shape
        g = _group(self.data.dtype)
        w = self.data.reshape(blocks, steps, BLOCK, g).transpose(1, 3, 0, 2)
        w = w.reshape(g * steps, blocks * BLOCK)
        return w[: self.in_features, : self.out_features]


def packed_matmul(x: jax.Array, w: PackedWeight) -> jax.Array:
    """x [..., K] times the packed weight: float32 [..., N] (x rounded to the weight's dtype first)."""
    lead = x.shape[:-1]
    dtype = w.data.dtype
    if np.dtype(dtype) not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16)):
        raise TypeError(f"packed_matmul takes float32 or bfloat16 weights, not {dtype} "
                        "(int8: packed_int8_matmul)")
    # float32 rows: the bfloat16 kernel rounds them itself (XLA:CPU's convert is a scalar loop)
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    result = jax.ShapeDtypeStruct((rows.shape[0], w.data.shape[0] * BLOCK), jnp.float32)
    out = jax.ffi.ffi_call(MATMULS[np.dtype(dtype)], result)(rows, w.data)
    return out[:, : w.out_features].reshape(*lead, w.out_features)


def packed_int8_matmul(x: jax.Array, w: PackedWeight, scale: jax.Array) -> jax.Array:
    """x [..., K] times an int8 weight packed for the kernel with per-column scales [N]: float32
    [..., N]. x is quantised to int8 row by row (absmax / 127) as `models.quantize.int8_matmul`
    does, and the integer sums are exact: the same result as that XLA path, from half the bytes
    of a bfloat16 weight."""
    chex.assert_type(w.data, jnp.int8)
    chex.assert_shape(scale, (w.out_features,))
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    result = jax.ShapeDtypeStruct((rows.shape[0], w.data.shape[0] * BLOCK), jnp.float32)
    out = jax.ffi.ffi_call("hsd_s8_matmul", result)(rows, w.data, scale.astype(jnp.float32))
    return out[:, : w.out_features].reshape(*lead, w.out_features)


def cached_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: int,
                     mask: jax.Array) -> jax.Array:
    """Grouped-query attention of q [B, T, H, D] against layer `layer` of a float32 cache
    [L, B, S, H_kv, D], read in place (no copy of the layer), under mask [B, T, S]: float32
    [B, T, H, D], D <= 256. Each query row's result depends only on that row (its scores, softmax
    and sum run over the cache positions in one order whatever T is). A row with no position
    unmasked gets zeros (XLA's softmax over all-masked scores gives the mean of v; decoding never
    forms such a row)."""
    chex.assert_rank(q, 4)
    chex.assert_rank(cache_k, 5)
    chex.assert_equal_shape([cache_k, cache_v])
    chex.assert_shape(mask, (q.shape[0], q.shape[1], cache_k.shape[2]))
    result = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call("hsd_attention", result)(q.astype(jnp.float32), cache_k, cache_v, mask,
                                                     layer=np.int64(layer))


def _per_row(target: str, x: jax.Array, dtype, *operands, width: tuple[int, ...] = (), **attrs) -> jax.Array:
    """Our kernel's `target` over the rows of x [..., W] as float32 (the kernel takes any leading
    shape): [..., *width] of `dtype`. Under jax.vmap the batch is more rows."""
    x = x.astype(jnp.float32)
    result = jax.ShapeDtypeStruct(x.shape[:-1] + width, dtype)
    return jax.ffi.ffi_call(target, result, vmap_method="broadcast_all")(x, *operands, **attrs)


def row_sums(x: jax.Array) -> jax.Array:
    """float32 x [..., D] summed over its last axis, keepdims: [..., 1], each row in one order
    whatever the number of rows (XLA's reductions vectorise by shape)."""
    return _per_row("hsd_row_sums", x, jnp.float32)[..., None]


def argmax(x: jax.Array) -> jax.Array:
    """int32 [...]: the first index of the largest value along x's last axis, a NaN counting as
    the largest: exactly `jnp.argmax`'s answer. XLA:CPU runs an argmax as a scalar loop (~0.25 ms
    a row of a 49k vocabulary, as much as a small draft's forward); the kernel takes microseconds."""
    return _per_row("hsd_argmax", x, jnp.int32)


def softmax(x: jax.Array, temperature: float = 1.0) -> jax.Array:
    """float32 softmax(x / temperature) over x's last axis, as `jax.nn.softmax` computes it (the
    maximum taken off before the exponential; a row with a NaN, or whose maximum / temperature is
    +-inf, all NaN; denormals 0):
    within 3.5 ulp of exact (XLA's within 2), its sum in float64. ~20 µs a row of 49k."""
    if not temperature > 0:
        raise ValueError(f"softmax needs a temperature > 0, got {temperature!r}")
    return _per_row("hsd_softmax", x, jnp.float32, width=x.shape[-1:], temperature=np.float32(temperature))


def sample(mass: jax.Array, uniforms: jax.Array) -> jax.Array:
    """int32 [...]: one token per row of `mass` [..., V] (unnormalised, entries <= 0 or NaN carry
    none) by `sampling.sample`'s two-stage inversion, with `uniforms` [..., 2] in [0, 1) as its
    two uniforms; a row with no mass gives V - 1."""
    chex.assert_shape(uniforms, (*mass.shape[:-1], 2))
    return _per_row("hsd_sample", mass, jnp.int32, uniforms.astype(jnp.float32))


def embedding_rows(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """float32 rows `table[tokens]` of a bfloat16 table [V, D], read in place: XLA:CPU gathers from a
    bf16 table by converting all of it to float32, a convert that loop-invariant code motion hoists
    out of a decode loop (37 ms for SmolLM2's table at the start of every streamed chunk)."""
    chex.assert_rank(table, 2)
    chex.assert_type(table, jnp.bfloat16)
    ids = tokens.reshape(-1).astype(jnp.int32)
    result = jax.ShapeDtypeStruct((ids.shape[0], table.shape[1]), jnp.float32)
    return jax.ffi.ffi_call("hsd_embedding_rows", result)(table, ids).reshape(*tokens.shape, table.shape[1])


def unpacked(w):
    """A packed weight as its [K, N] array; anything else as it is."""
    return w.unpack() if isinstance(w, PackedWeight) else w
