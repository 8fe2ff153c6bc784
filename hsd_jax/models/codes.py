"""float32 weights stored as the block codes they are: a GGUF's Q4_1 and Q8_0 tensors, dequantized.

Every run of 32 values along K of one column of such a weight is exactly fma(d, q, m) for float16 d
and m and a 4-bit q (Q4_1) or d q for an 8-bit q (Q8_0). `CodedWeight.encode` finds those codes
for a float32 weight, checking that they reproduce every value bit for bit (else None), and
`coded_matmul` runs our CPU kernel's block-code product (`kernels/coded.h`) on them: each weight
decoded in registers to the same float32 value and the products summed in the float32 kernel's
order, so the result equals `cpu_kernel.packed_matmul` on the float32 weight bit for bit, from
0.625 (4-bit) or 1.125 (8-bit) bytes a weight against 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hsd_jax.models.cpu_kernel import BLOCK

CODE_GROUP = 32  # values along K that one block code covers (GGUF's Q4_1 and Q8_0 blocks)
_CODE_RANGES = {4: (0, 15), 8: (-128, 127)}


@struct.dataclass
class CodedWeight:
    """A float32 weight [K, N] each of whose runs of 32 values along K in one column is exactly
    fma(d, q, m) for float16 d and m and integers q of 4 bits (0..15) or 8 bits (-128..127, m = 0):
    what a GGUF Q4_1 or Q8_0 tensor dequantized to float32 is. Stored as those scales and codes,
    `data` uint8 [ceil(N/16), K/32, 64 + 16 * 32 * bits / 8]: for each block of 16 columns and
    group of 32 values of k, the columns' d and m, then their codes (`kernels/coded.h`). The kernel
    decodes them to the same float32 values and multiplies in the float32 kernel's order: the
    float32 product bit for bit, from 0.625 (4 bits) or 1.125 (8 bits) bytes a weight against 4."""

    data: jax.Array
    in_features: int = struct.field(pytree_node=False)
    out_features: int = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False)

    @classmethod
    def encode(cls, w) -> CodedWeight | None:
        """The block codes of a float32 weight [K, N] whose every value they reproduce bit for bit,
        with the fewest bits that do; None if there are none (K not a multiple of 32, or values that
        are not such blocks, as trained weights are not)."""
        w = np.asarray(w)
        if w.ndim != 2 or w.dtype != np.float32 or w.shape[0] % CODE_GROUP or w.size == 0:
            return None
        k, n = w.shape
        blocks = w.reshape(k // CODE_GROUP, CODE_GROUP, n)
        for bits in _CODE_RANGES:
            if _fit_codes(blocks[..., :BLOCK], bits) is None:  # a cheap refusal on the first columns
                continue
            width = max(BLOCK, 2**22 // k)  # columns at a time: float64 temporaries of ~32 MB
            parts = [_fit_codes(blocks[..., c: c + width], bits) for c in range(0, n, width)]
            if all(p is not None for p in parts):
                q, d, m = (np.concatenate(a, axis=-1) for a in zip(*parts))
                return cls._packed(q, d, m, k, n, bits)
        return None

    @classmethod
    def _packed(cls, q: np.ndarray, d: np.ndarray, m: np.ndarray, k: int, n: int, bits: int) -> CodedWeight:
        pad = -n % BLOCK
        q, d, m = (np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]) for a in (q, d, m))
        groups, width = k // CODE_GROUP, (n + pad) // BLOCK
        if bits == 4:  # byte 16 j + c: k = 2 j in the low nibble, 2 j + 1 in the high one
            pairs = q.astype(np.uint8).reshape(groups, CODE_GROUP // 2, 2, width, BLOCK)
            codes = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
        else:
            codes = q.astype(np.int8).view(np.uint8).reshape(groups, CODE_GROUP, width, BLOCK)
        codes = codes.transpose(2, 0, 1, 3).reshape(width, groups, -1)
        scales = np.stack([d.reshape(groups, width, BLOCK), m.reshape(groups, width, BLOCK)], axis=2)
        scales = scales.astype(np.float16).transpose(1, 0, 2, 3).reshape(width, groups, -1).view(np.uint8)
        return cls(data=jnp.asarray(np.concatenate([scales, codes], axis=-1)), in_features=k, out_features=n,
                   bits=bits)

    @property
    def shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def unpack(self) -> jax.Array:
        """The float32 weight [K, N] (computed on the host)."""
        data = np.asarray(self.data)
        width, groups, _ = data.shape
        scales = np.ascontiguousarray(data[..., :64]).view(np.float16).astype(np.float32)
        codes = data[..., 64:]
        if self.bits == 4:
            shifts = np.array([0, 4], np.uint8)[:, None]
            nibbles = codes.reshape(width, groups, CODE_GROUP // 2, 1, BLOCK) >> shifts
            q = (nibbles & 15).reshape(width, groups, CODE_GROUP, BLOCK)
        else:
            q = codes.view(np.int8).reshape(width, groups, CODE_GROUP, BLOCK)
        d, m = scales[..., None, :BLOCK], scales[..., None, BLOCK:]
        w = (d.astype(np.float64) * q + m).astype(np.float32)  # exact products and sums (see _fit_codes)
        w = w.transpose(1, 2, 0, 3).reshape(groups * CODE_GROUP, width * BLOCK)
        return jnp.asarray(w[:, : self.out_features])


def _fit_codes(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Codes q [G, 32, N] and scales d, m [G, N] with fma(d, q, m) == blocks [G, 32, N] bit for bit,
    or None. d and m are float16, as GGUF stores them: m the block's least value, d sought among
    the float16 values next to its span / range. With float16 scales d q + m is exact in float64,
    so its float32 rounding is the kernel's FMA; the checks that the sum is exact and the scales
    are not float32 denormals (XLA runs with denormals as zero; the kernel's float16 -> float32
    convert ignores that) hold for float16 scales and guard any change to wider ones."""
    lo, hi = _CODE_RANGES[bits]
    if not np.isfinite(blocks).all():
        return None
    if bits == 4:
        m = blocks.min(axis=1)
        estimate = (blocks.max(axis=1).astype(np.float64) - m) / hi
    else:
        m = np.zeros(blocks[:, 0].shape, np.float32)
        estimate = np.abs(blocks).max(axis=1).astype(np.float64) / hi
    tiny = np.finfo(np.float32).tiny
    with np.errstate(over="ignore"):  # beyond float16: refused just below
        m16, half = m.astype(np.float16), estimate.astype(np.float16)
    if (((m != 0) & (np.abs(m) < tiny)).any() or (m16.astype(np.float32) != m).any()
            or not np.isfinite(half).all()):
        return None
    half = half.view(np.uint16).astype(np.int32)

    def attempt(step, v, m, half, estimate):  # v [..., 32, X]; the rest [..., X]
        d = (half + step).clip(0, 0x7BFF).astype(np.uint16).view(np.float16).astype(np.float32)
        d = np.where((estimate == 0) | (d < tiny), np.float32(0), d)[..., None, :]
        m64 = m.astype(np.float64)[..., None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d == 0, 0.0, np.rint((v - m64) / d)).clip(lo, hi)
        product = d.astype(np.float64) * q
        total = product + m64
        same = total.astype(np.float32).view(np.uint32) == v.view(np.uint32)
        good = (same & (_two_sum_error(product, m64, total) == 0)).all(axis=-2)
        return good, d[..., 0, :], q.astype(np.int16)

    good, d, q = attempt(0, blocks, m, half, estimate)  # every block at once; the few left below
    for step in (-1, 1, -2, 2):
        rows, cols = np.nonzero(~good)
        if not rows.size:
            break
        ok, d_some, q_some = attempt(step, blocks[rows, :, cols].T, m[rows, cols], half[rows, cols],
                                     estimate[rows, cols])
        d[rows[ok], cols[ok]] = d_some[ok]
        q[rows[ok], :, cols[ok]] = q_some[:, ok].T
        good[rows[ok], cols[ok]] = True
    return (q, d, m) if good.all() else None


def _two_sum_error(a: np.ndarray, b: np.ndarray, total: np.ndarray) -> np.ndarray:
    """(a + b) - total exactly, for total = fl(a + b) (Knuth's TwoSum)."""
    b_part = total - a
    a_part = total - b_part
    return (a - a_part) + (b - b_part)


def coded_matmul(x: jax.Array, w: CodedWeight) -> jax.Array:
    """x [..., K] times the block-coded weight: float32 [..., N], equal bit for bit to
    `packed_matmul` on the float32 weight it encodes."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    result = jax.ShapeDtypeStruct((rows.shape[0], w.data.shape[0] * BLOCK), jnp.float32)
    out = jax.ffi.ffi_call("hsd_coded_matmul", result)(rows, w.data, bits=np.int64(w.bits))
    return out[:, : w.out_features].reshape(*lead, w.out_features)
