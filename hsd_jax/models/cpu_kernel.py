"""bfloat16 products on XLA:CPU through our own kernel (AVX512-BF16, `kernels/bf16_matmul.cc`).

XLA:CPU runs a one-row bfloat16 dot by converting the whole weight to float32, and a k-row one
through a GEMM library that is far from the memory bound at k <= 16 (../shared/cpu-dots.md). The
kernel here reads each weight once for up to 16 rows, from a layout packed once at load
(`PackedBf16`: [N/16, K/2, 16, 2], the pairs VDPBF16PS multiplies), and accumulates in float32.
Every output element adds the same products in the same order whatever the number of rows, so a
one-token step and a k-token check compute a row bit for bit alike.

The kernel is compiled with g++ on first use into a cache directory ($XDG_CACHE_HOME/hsd_jax, else
~/.cache/hsd_jax), keyed by the source and jaxlib's version, and registered as an XLA FFI target.
`available()` is False, and bfloat16 models keep XLA's own dots, where the CPU lacks AVX512-BF16,
no compiler is found, the build fails (`build_error()` says why), the backend is not the CPU, or
HSD_JAX_BF16_KERNEL=0 is set. Importing this module builds nothing and sets no XLA flag.
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

import jax
import jax.numpy as jnp
import jaxlib
from flax import struct

SOURCE = Path(__file__).with_name("kernels") / "bf16_matmul.cc"
TARGET_NAME = "hsd_bf16_matmul"
BLOCK = 16  # output columns per packed block (one AVX-512 register of float32)
_errors: list[str] = []


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hsd_jax"


def _build() -> Path:
    """The compiled library, built on first use (atomically: a killed build leaves nothing)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + jaxlib.__version__.encode()).hexdigest()[:16]
    library = _cache_dir() / f"bf16_matmul-{key}.so"
    if library.is_file():
        return library
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        command = [compiler, "-O3", "-std=c++17", "-mavx512f", "-mavx512bf16", "-pthread", "-fPIC", "-shared",
                   "-w", f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {run.stderr.strip()[-500:]}")
        os.replace(built, library)
    return library


@functools.cache
def _register() -> bool:
    if os.environ.get("HSD_JAX_BF16_KERNEL", "1") == "0":
        _errors.append("HSD_JAX_BF16_KERNEL=0")
        return False
    if not _cpu_has_avx512_bf16():
        _errors.append("this CPU has no AVX512-BF16")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(library.HsdBf16Matmul), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        _errors.append(str(e))
        return False
    return True


def available() -> bool:
    """Whether bfloat16 weights can run on the kernel here (it is built and registered on the first call)."""
    return jax.default_backend() == "cpu" and _register()


def build_error() -> str | None:
    """Why the kernel is not available, once `available()` has said so."""
    return _errors[-1] if _errors else None


@struct.dataclass
class PackedBf16:
    """A bfloat16 weight [K, N] packed for the kernel: `data` [ceil(N/16), ceil(K/2), 32], each
    block of 16 output columns one contiguous run of (k, k+1) pairs; zero padding on both axes."""

    data: jax.Array
    in_features: int = struct.field(pytree_node=False)
    out_features: int = struct.field(pytree_node=False)

    @classmethod
    def pack(cls, w: jax.Array) -> PackedBf16:
        k, n = w.shape
        w = jnp.pad(jnp.asarray(w, jnp.bfloat16), ((0, k % 2), (0, -n % BLOCK)))
        blocks = w.reshape(w.shape[0] // 2, 2, w.shape[1] // BLOCK, BLOCK).transpose(2, 0, 3, 1)
        data = blocks.reshape(blocks.shape[0], blocks.shape[1], 2 * BLOCK)
        return cls(data=data, in_features=k, out_features=n)

    def unpack(self) -> jax.Array:
        blocks, pairs, _ = self.data.shape
        w = self.data.reshape(blocks, pairs, BLOCK, 2).transpose(1, 3, 0, 2)
        w = w.reshape(2 * pairs, blocks * BLOCK)
        return w[: self.in_features, : self.out_features]


def packed_matmul(x: jax.Array, w: PackedBf16) -> jax.Array:
    """x [..., K] times the packed weight: float32 [..., N] (x rounded to bfloat16 first)."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.bfloat16)
    rows = jnp.pad(rows, ((0, 0), (0, 2 * w.data.shape[1] - rows.shape[1])))
    result = jax.ShapeDtypeStruct((rows.shape[0], w.data.shape[0] * BLOCK), jnp.float32)
    out = jax.ffi.ffi_call(TARGET_NAME, result)(rows, w.data)
    return out[:, : w.out_features].reshape(*lead, w.out_features)


def unpacked(w):
    """A packed weight as its [K, N] array; anything else as it is."""
    return w.unpack() if isinstance(w, PackedBf16) else w
