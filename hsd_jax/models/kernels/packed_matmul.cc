// x [M, K] times a weight packed once at load, for XLA:CPU through the XLA FFI
// (`hsd_jax.models.cpu_kernel`), result float32 [M, N]:
// * float32 weights packed as [N/16, K, 16]: AVX-512 FMA;
// * bfloat16 weights packed as [N/16, K/2, 16, 2] (the pairs VDPBF16PS multiplies): AVX512-BF16;
// * int8 weights with a float32 scale per column, packed as [N/16, K/4, 16, 4] (the quads VPDPBUSD
//   multiplies), against x quantised to int8 row by row (absmax / 127): AVX512-VNNI, exact int32 sums.
// And attention of query rows against one layer of the float32 KV cache, read in place, and the
// row sums the norms take: both row by row, in an order that does not depend on the row count.
// And rows of a bf16 embedding table as float32, read in place, and each row's argmax; and
// sampling's softmax and two-stage draw over the vocabulary.
//
// Each weight element is read from memory once per call: rows run in groups of up to 8 whose
// accumulators stay in registers, and every group runs over one span of column blocks before the
// next span (the groups after the first read it from L2), so a k-token pass costs about what one
// token does; the weights are read in their packed order, one contiguous stream per 16 output
// columns. Every output element is one
// accumulator that adds the same products in the same order whatever M is: a row's result does
// not depend on the other rows (a one-token step and a k-token pass agree bit for bit).
#include "common.h"
#include "coded.h"

namespace {

// One multiply-accumulate step of each element type: x's element (a float, or a pair of bf16 as
// 32 bits) broadcast against one packed step of 16 output columns.
// Float accumulators (float32 and bfloat16 weights).
struct FloatSums {
  using Acc = __m512;
  static Acc Zero() { return _mm512_setzero_ps(); }
  static void Store(float* out, Acc acc) { _mm512_storeu_ps(out, acc); }
};

struct F32 : FloatSums {
  using X = float;
  using W = float;
  using V = __m512;
  static constexpr int64_t kStep = 16;  // weight elements per step and block
  static V Load(const W* w) { return _mm512_loadu_ps(w); }
  static V Broadcast(X x) { return _mm512_set1_ps(x); }
  static Acc Mac(Acc acc, V x, V w) { return _mm512_fmadd_ps(x, w, acc); }
};

struct Bf16 : FloatSums {
  using X = uint32_t;
  using W = uint16_t;
  using V = __m512bh;
  static constexpr int64_t kStep = 32;
  static V Load(const W* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static V Broadcast(X x) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(x)); }
  static Acc Mac(Acc acc, V x, V w) { return _mm512_dpbf16_ps(acc, x, w); }
};

// int8: VPDPBUSD multiplies unsigned by signed bytes, so a weight q is read as the byte q + 128
// (q ^ 0x80) and the sum carries 128 * sum(x) more, taken off afterwards. The int32 sums are stored
// in the float output's place and rescaled there (the epilogue in `S8MatmulImpl`).
struct S8 {
  using X = uint32_t;  // four int8 of x
  using W = int8_t;
  using V = __m512i;
  using Acc = __m512i;
  static constexpr int64_t kStep = 64;
  static V Load(const W* w) { return _mm512_xor_si512(_mm512_loadu_si512(w), _mm512_set1_epi8(-128)); }
  static V Broadcast(X x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static Acc Zero() { return _mm512_setzero_si512(); }
  static Acc Mac(Acc acc, V x, V w) { return _mm512_dpbusd_epi32(acc, w, x); }
  static void Store(float* out, Acc acc) { _mm512_storeu_si512(out, acc); }
};

// Rows [m0, m0 + RT) times column blocks [b0, b0 + CB), over all `steps` packed steps.
template <typename E, int RT, int CB>
inline void Tile(const typename E::X* x, int64_t steps, const typename E::W* w, float* out, int64_t n,
                 int64_t m0, int64_t b0) {
  typename E::Acc acc[RT][CB];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = E::Zero();
  const typename E::W* wp[CB];
  for (int c = 0; c < CB; ++c) wp[c] = w + (b0 + c) * steps * E::kStep;
  for (int64_t s = 0; s < steps; ++s) {
    typename E::V wv[CB];
    for (int c = 0; c < CB; ++c) wv[c] = E::Load(wp[c] + s * E::kStep);
    for (int r = 0; r < RT; ++r) {
      const typename E::V xv = E::Broadcast(x[(m0 + r) * steps + s]);
      for (int c = 0; c < CB; ++c) acc[r][c] = E::Mac(acc[r][c], xv, wv[c]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) E::Store(out + (m0 + r) * n + (b0 + c) * 16, acc[r][c]);
}

// Rows [m0, m0 + RT) times column blocks [b, end): tiles of CB blocks, the rest in narrower ones.
template <typename E, int RT, int CB>
void Span(const typename E::X* x, int64_t steps, const typename E::W* w, float* out, int64_t n, int64_t m0,
          int64_t b, int64_t end) {
  for (; b + CB <= end; b += CB) Tile<E, RT, CB>(x, steps, w, out, n, m0, b);
  if constexpr (CB > 1) {
    if (b < end) Span<E, RT, CB / 2>(x, steps, w, out, n, m0, b, end);
  }
}

// A group of 1 to 8 rows over column blocks [b, end), in the widest tile that fits the 32 vector
// registers: RT * CB accumulators, CB weight vectors and one broadcast x.
template <typename E>
void Group(const typename E::X* x, int64_t steps, const typename E::W* w, float* out, int64_t n, int64_t m0,
           int64_t rows, int64_t b, int64_t end) {
  switch (rows) {
    case 1: return Span<E, 1, 6>(x, steps, w, out, n, m0, b, end);
    case 2: return Span<E, 2, 6>(x, steps, w, out, n, m0, b, end);
    case 3: return Span<E, 3, 6>(x, steps, w, out, n, m0, b, end);
    case 4: return Span<E, 4, 6>(x, steps, w, out, n, m0, b, end);
    case 5: return Span<E, 5, 3>(x, steps, w, out, n, m0, b, end);
    case 6: return Span<E, 6, 3>(x, steps, w, out, n, m0, b, end);
    case 7: return Span<E, 7, 3>(x, steps, w, out, n, m0, b, end);
    default: return Span<E, 8, 3>(x, steps, w, out, n, m0, b, end);
  }
}

// Column blocks [first, last) of every row, in groups of up to 8 rows over spans of 12 blocks (12
// blocks of bf16 at K = 1536: 590 KB, in L2; float32 twice that, and a larger K more: then they come
// from L3 or memory again, a matter of speed only). Pool chunks are multiples of 6 blocks: the tiles'
// widths divide 6.
constexpr int64_t kSpanBlocks = 12, kChunkBlocks = 6;
template <typename E>
void Blocks(const typename E::X* x, int64_t m, int64_t steps, const typename E::W* w, float* out, int64_t n,
            int64_t first, int64_t last) {
  RowGroupsBySpan(m, 8, kSpanBlocks, first, last, [&](int64_t m0, int64_t rows, int64_t b, int64_t end) {
    Group<E>(x, steps, w, out, n, m0, rows, b, end);
  });
}

// The first min(count, 16) lanes (none for count <= 0).
inline __mmask16 Lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : count <= 0 ? 0 : static_cast<__mmask16>((1u << count) - 1);
}

// x [M, steps] (elements of E::X) times w [N/16, steps, kStep] -> out [M, N], over the pool.
template <typename E>
void RunPacked(const typename E::X* xp, int64_t m, int64_t steps, const typename E::W* wp, int64_t blocks,
               float* op) {
  Pool::Get().Run(blocks, ColumnChunk(blocks, kChunkBlocks), [&](int64_t first, int64_t last) {
    Blocks<E>(xp, m, steps, wp, op, blocks * 16, first, last);
  });
}

ffi::Error F32MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  if (!PackedShapes(x, w, 1)) return F32ShapeError();
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  RunPacked<F32>(x.typed_data(), xd[0], wd[1], w.typed_data(), wd[0], out->typed_data());
  return ffi::Error::Success();
}

// x float32 [M, K] rounded to bfloat16 here (nearest even, as XLA's convert: in XLA:CPU that
// convert ran as a scalar loop, 14 µs a projection at 16 rows), in the (k, k+1) pairs VDPBF16PS
// takes, zero past K; times w [N/16, ceil(K/2), 32].
ffi::Error Bf16MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> out) {
  if (!PackedShapes(x, w, 2)) return Bf16ShapeError();
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const int64_t m = xd[0], k = xd[1], steps = wd[1];
  std::vector<uint32_t> pairs(m * steps);
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x.typed_data() + r * k;
    auto* dst = reinterpret_cast<uint16_t*>(pairs.data() + r * steps);
    for (int64_t i = 0; i < 2 * steps; i += 32) {
      const __m512 lo = _mm512_maskz_loadu_ps(Lanes(k - i), row + i);
      const __m512 hi = _mm512_maskz_loadu_ps(Lanes(k - i - 16), row + i + 16);
      const int64_t left = std::min<int64_t>(32, 2 * steps - i);
      _mm512_mask_storeu_epi16(dst + i, left >= 32 ? ~0u : (1u << left) - 1,
                               reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
  RunPacked<Bf16>(pairs.data(), m, steps, reinterpret_cast<const uint16_t*>(w.untyped_data()), wd[0],
                  out->typed_data());
  return ffi::Error::Success();
}

// x float32 [M, K] quantised row by row as the XLA int8 path does (`models.quantize.int8_matmul`):
// scale = absmax / 127 (1 for a zero row), q = round-half-even(x / scale) clipped to +-127; then
// times int8 weights packed [N/16, ceil(K/4), 64] with per-column scales [N]: float32 [M, N/16 * 16]
// = float(sum q_x q_w) * scale_x * scale_w (columns past N: 0). The int32 sums wrap and come out
// exact while |sum q_x q_w| <= 127 * 127 * K < 2^31 (K <= kMaxS8K), so a row's result does not
// depend on the other rows. A row holding NaN or inf gets an unspecified finite result, as in
// XLA's int8 path (int8 copies run as drafts, whose proposals their verifier checks).
ffi::Error S8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> w_scale,
                        ffi::ResultBuffer<ffi::F32> out) {
  if (!S8Shapes(x, w, w_scale)) return S8ShapeError();
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const int64_t m = xd[0], k = xd[1], steps = wd[1], blocks = wd[0], n = blocks * 16;
  const int64_t columns = w_scale.dimensions()[0];
  const float* xp = x.typed_data();
  std::vector<int8_t> xq(m * steps * 4, 0);
  std::vector<float> x_scale(m);
  std::vector<int32_t> x_sum(m);
  for (int64_t r = 0; r < m; ++r) {  // 16 lanes at a time, each lane as the scalar rule computes it
    const float* row = xp + r * k;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(Lanes(k - i), row + i)));
    const float absmax = _mm512_reduce_max_ps(amax);
    const float scale = absmax > 0.f ? absmax / 127.f : 1.f;
    const __m512 divisor = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 lanes = Lanes(k - i);
      const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(lanes, row + i), divisor),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
      const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, q)));
      sum = _mm512_add_epi32(sum, qi);  // lanes past k hold 0 / scale = 0
      _mm512_mask_cvtepi32_storeu_epi8(xq.data() + r * steps * 4 + i, lanes, qi);
    }
    x_scale[r] = scale;
    x_sum[r] = _mm512_reduce_add_epi32(sum);
  }
  const auto* xs = reinterpret_cast<const uint32_t*>(xq.data());
  const auto* wp = reinterpret_cast<const int8_t*>(w.untyped_data());
  const float* ws = w_scale.typed_data();
  float* op = out->typed_data();
  const int64_t chunk = ColumnChunk(blocks, kChunkBlocks);
  Pool::Get().Run(blocks, chunk, [&](int64_t first, int64_t last) {
    Blocks<S8>(xs, m, steps, wp, op, n, first, last);
    for (int64_t r = 0; r < m; ++r) {  // the epilogue of these columns, in place: (sum * scale_x) * scale_w
      float* row = op + r * n;
      const __m512i offset = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(x_sum[r]) * 128u));
      const __m512 row_scale = _mm512_set1_ps(x_scale[r]);
      for (int64_t c = first * 16; c < last * 16; c += 16) {
        const __mmask16 lanes = Lanes(columns - c);
        const __m512 sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(row + c), offset));
        const __m512 scaled = _mm512_mul_ps(_mm512_mul_ps(sums, row_scale), _mm512_maskz_loadu_ps(lanes, ws + c));
        _mm512_storeu_ps(row + c, _mm512_maskz_mov_ps(lanes, scaled));
      }
    }
  });
  return ffi::Error::Success();
}

// exp on 16 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p a degree-6 Taylor polynomial
// (relative error below 2e-7); exact 0 below -87.3.
inline __m512 Exp(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~underflow), p, n);
}

// One query row's heads of one KV group: out[g] = softmax(q[g] . k[s] * scale over the valid s) . v.
// A row's result depends only on its own q, mask row and the cache: not on the other rows.
// kChunks: d / 16 known at compile time (loops unrolled, no masked loads), or 0: any d <= 256.
// The scores of all kGroups heads of a KV group (head width 16 kChunks) against every valid
// position, each cached key loaded once for all of them and every q in registers: scores[g * size
// + s], tops[g] their maxima. Each score adds the same products in the same order as the one-head
// loop in AttendGroup.
template <int kChunks, int kGroups>
void GroupScores(const float* q, const float* k, const bool* mask, int64_t size, int64_t kv_stride, float scale,
                 float* scores, float* tops) {
  __m512 qv[kGroups][kChunks];
  float top[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    top[g] = -INFINITY;
    for (int c = 0; c < kChunks; ++c) qv[g][c] = _mm512_loadu_ps(q + (g * kChunks + c) * 16);
  }
  for (int64_t s = 0; s < size; ++s) {
    if (!mask[s]) continue;
    __m512 kv[kChunks];
    for (int c = 0; c < kChunks; ++c) kv[c] = _mm512_loadu_ps(k + s * kv_stride + 16 * c);
    for (int g = 0; g < kGroups; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < kChunks; ++c) acc = _mm512_fmadd_ps(qv[g][c], kv[c], acc);
      const float score = _mm512_reduce_add_ps(acc) * scale;
      scores[g * size + s] = score;
      top[g] = std::max(top[g], score);
    }
  }
  for (int g = 0; g < kGroups; ++g) tops[g] = top[g];
}
using GroupScoresFn = void (*)(const float*, const float*, const bool*, int64_t, int64_t, float, float*, float*);

// The GroupScores for a head width and group size whose q fits 16 registers, else null.
inline GroupScoresFn GroupScoresFor(int64_t d, int64_t groups) {
  if (d == 64) {
    switch (groups) {
      case 1: return GroupScores<4, 1>;
      case 2: return GroupScores<4, 2>;
      case 3: return GroupScores<4, 3>;
      case 4: return GroupScores<4, 4>;
    }
  }
  if (d == 128 && groups <= 2) return groups == 1 ? GroupScores<8, 1> : GroupScores<8, 2>;
  return nullptr;
}

template <int kChunks>
void AttendGroup(const float* q, const float* k, const float* v, const bool* mask, float* out, int64_t groups,
                 int64_t size, int64_t d, int64_t kv_stride, float scale, float* scores, GroupScoresFn shared) {
  const __mmask16 tail = kChunks ? static_cast<__mmask16>(0xFFFF)
                                 : static_cast<__mmask16>((1u << (d % 16 ? d % 16 : 16)) - 1);
  const int64_t chunks = kChunks ? kChunks : (d + 15) / 16;
  auto load = [&](const float* p, int64_t c) {
    return kChunks || c != chunks - 1 ? _mm512_loadu_ps(p + 16 * c) : _mm512_maskz_loadu_ps(tail, p + 16 * c);
  };
  float tops[16];
  if (shared) shared(q, k, mask, size, kv_stride, scale, scores, tops);
  for (int64_t g = 0; g < groups; ++g) {
    const float* qg = q + g * d;
    float* sg = scores + g * size;
    float top = shared ? tops[g] : -INFINITY;
    if (!shared) {
      __m512 qv[16];  // in registers: stores to sg may alias q for the compiler, which reloaded it
      for (int64_t c = 0; c < chunks; ++c) qv[c] = load(qg, c);
      for (int64_t s = 0; s < size; ++s) {
        if (!mask[s]) continue;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[c], load(k + s * kv_stride, c), acc);
        sg[s] = _mm512_reduce_add_ps(acc) * scale;
        top = std::max(top, sg[s]);
      }
    }
    float total = 0.f;
    __m512 acc[16];
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < size; s0 += 16) {
      const int64_t width = std::min<int64_t>(16, size - s0);
      __mmask16 valid = 0;
      for (int64_t i = 0; i < width; ++i) valid |= static_cast<__mmask16>(mask[s0 + i]) << i;
      if (!valid) continue;
      alignas(64) float weight[16];
      const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, sg + s0), _mm512_set1_ps(top)));
      _mm512_store_ps(weight, _mm512_maskz_mov_ps(valid, e));
      for (int64_t i = 0; i < width; ++i) {
        if (!(valid >> i & 1)) continue;
        total += weight[i];
        const __m512 w = _mm512_set1_ps(weight[i]);
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(w, load(v + (s0 + i) * kv_stride, c), acc[c]);
      }
    }
    const __m512 norm = _mm512_set1_ps(total > 0.f ? 1.f / total : 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 o = _mm512_mul_ps(acc[c], norm);
      if (c == chunks - 1) _mm512_mask_storeu_ps(out + g * d + 16 * c, tail, o);
      else _mm512_storeu_ps(out + g * d + 16 * c, o);
    }
  }
}

// q [B, T, H, D]; k, v: the whole cache [L, B, S, H_kv, D], of which layer `layer` is read in place;
// mask [B, T, S] -> out [B, T, H, D]. Heads of one KV group are adjacent in q (H = H_kv * G).
ffi::Error AttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                         ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out, int64_t layer) {
  AttentionShape shape;
  if (!ReadAttentionShape(q, k, mask, layer, shape)) return AttentionShapeError();
  const auto attend = shape.d == 64 ? AttendGroup<4> : shape.d == 128 ? AttendGroup<8> : AttendGroup<0>;
  const GroupScoresFn shared = GroupScoresFor(shape.d, shape.groups);
  ForEachAttentionTask(shape, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), out->typed_data(),
                       [&](const AttentionTask& t, float* scores) {
                         attend(t.q, t.k, t.v, t.mask, t.out, shape.groups, shape.size, shape.d, shape.kv_stride,
                                shape.scale, scores, shared);
                       });
  return ffi::Error::Success();
}

// The largest of a row's v >= 1 values, and whether any is NaN (one vector pass).
inline float RowMax(const float* row, int64_t v, bool& nan) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  int64_t i = 0;
  for (; i + 16 <= v; i += 16) {
    const __m512 y = _mm512_loadu_ps(row + i);
    unordered |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    top = _mm512_max_ps(top, y);
  }
  if (i < v) {
    const __m512 y = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), Lanes(v - i), row + i);
    unordered |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    top = _mm512_max_ps(top, y);
  }
  nan = unordered != 0;
  return _mm512_reduce_max_ps(top);
}

// x [..., D] -> out [...]: each row summed in 16 lanes, in order, then across the lanes.
ffi::Error RowSumsImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  int64_t rows, d;
  if (!AsRows(x, rows, d)) return ffi::Error::InvalidArgument("hsd row sums: x must be [..., D], D >= 1");
  const float* xp = x.typed_data();
  float* op = out->typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * d;
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(row + i));
    if (i < d) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(Lanes(d - i), row + i));
    op[r] = _mm512_reduce_add_ps(acc);
  }
  return ffi::Error::Success();
}

// x [..., V] -> out [...] int32: each row's first index of its largest element, a NaN counting as
// the largest (jnp.argmax's answer, exactly). XLA:CPU runs an argmax as a scalar loop, ~0.25 ms
// for a 49k vocabulary; here one vector pass finds the maximum and a second its first index.
ffi::Error ArgmaxImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  int64_t rows, v;
  if (!AsRows(x, rows, v)) return ffi::Error::InvalidArgument("hsd argmax: x must be [..., V], V >= 1");
  const float* xp = x.typed_data();
  int32_t* op = out->typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * v;
    bool nan;
    const __m512 top = _mm512_set1_ps(RowMax(row, v, nan));
    int64_t found = 0;
    if (nan) {  // the first NaN
      while (!std::isnan(row[found])) ++found;
    } else {
      const __mmask16 tail = Lanes(v % 16);
      __mmask16 hit = 0;
      int64_t i;
      for (i = 0; i + 16 <= v && !hit; i += 16) hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), top, _CMP_EQ_OQ);
      if (hit) {
        i -= 16;
      } else {  // the maximum is in the tail
        hit = _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, row + i), top, _CMP_EQ_OQ);
      }
      found = i + __builtin_ctz(hit);
    }
    op[r] = static_cast<int32_t>(found);
  }
  return ffi::Error::Success();
}

// sum += x in float64 lanes. A softmax total adds float32 partial sums of 16 terms a lane this
// way, so it stays exact to float32 however peaked the row is (one float32 lane adding thousands
// of small terms to a large one drifts by up to ~1e-5).
inline void AddWide(__m512d& sum, __m512 x) {
  sum = _mm512_add_pd(sum, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
  sum = _mm512_add_pd(sum, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
}

// x [R, V] -> out [R, V]: softmax(x / temperature) of each row, as jax.nn.softmax computes it:
// e^(y - max y) / sum e^(y - max y) with y = x / temperature (a NaN or +inf in a row makes it all
// NaN, as there; below e^-87.3 0, as XLA:CPU flushes denormals), the sum in float64 and the
// division a multiplication by its reciprocal (within an ulp of dividing; a division per element
// cost more than the exponential). Three vector passes.
ffi::Error SoftmaxImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out, float temperature) {
  int64_t rows, v;
  if (!AsRows(x, rows, v)) return ffi::Error::InvalidArgument("hsd softmax: x must be [..., V], V >= 1");
  const __m512 t = _mm512_set1_ps(temperature);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x.typed_data() + r * v;
    float* o = out->typed_data() + r * v;
    bool nan;
    // division by a positive temperature keeps the order, so max(x) / t is max(x / t) exactly
    const float largest = RowMax(row, v, nan) / temperature;
    if (nan || !std::isfinite(largest)) {  // XLA's answer: NaN, or inf - inf, fills the row
      std::fill(o, o + v, NAN);
      continue;
    }
    const __m512 shift = _mm512_set1_ps(largest);
    const bool scaled = temperature != 1.0f;  // x / 1 is x
    __m512d sum = _mm512_setzero_pd();
    __m512 part = _mm512_setzero_ps();
    int64_t i;
    for (i = 0; i + 16 <= v; i += 16) {
      const __m512 y = scaled ? _mm512_div_ps(_mm512_loadu_ps(row + i), t) : _mm512_loadu_ps(row + i);
      const __m512 e = Exp(_mm512_sub_ps(y, shift));
      _mm512_storeu_ps(o + i, e);
      part = _mm512_add_ps(part, e);
      if ((i / 16) % 16 == 15) {  // float32 sums of 16 terms a lane, then float64
        AddWide(sum, part);
        part = _mm512_setzero_ps();
      }
    }
    AddWide(sum, part);
    if (i < v) {
      const __mmask16 tail = Lanes(v - i);
      const __m512 y = _mm512_div_ps(_mm512_maskz_loadu_ps(tail, row + i), t);
      const __m512 e = Exp(_mm512_sub_ps(y, shift));
      _mm512_mask_storeu_ps(o + i, tail, e);
      AddWide(sum, _mm512_maskz_mov_ps(tail, e));
    }
    const __m512 inverse = _mm512_set1_ps(static_cast<float>(1.0 / _mm512_reduce_add_pd(sum)));
    for (i = 0; i + 16 <= v; i += 16) _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(o + i), inverse));
    if (i < v) {
      const __mmask16 tail = Lanes(v - i);
      _mm512_mask_storeu_ps(o + i, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, o + i), inverse));
    }
  }
  return ffi::Error::Success();
}

// mass [R, V], uniforms [R, 2] -> out [R] int32: sampling.py's two-stage inversion of each row's
// CDF (a block of 256 tokens with the first uniform, a token inside it with the second), over
// the mass clamped at zero (a negative or NaN entry has none); a block's mass summed in float32
// lanes, the running sums in float64. A row with no mass gives V - 1.
ffi::Error SampleImpl(ffi::Buffer<ffi::F32> mass, ffi::Buffer<ffi::F32> uniforms, ffi::ResultBuffer<ffi::S32> out) {
  int64_t rows, v;
  if (!AsRows(mass, rows, v)) return ffi::Error::InvalidArgument("hsd sample: mass must be [..., V], V >= 1");
  if (uniforms.element_count() != 2 * rows) return ffi::Error::InvalidArgument("hsd sample: uniforms must be [..., 2]");
  SampleRows(mass.typed_data(), uniforms.typed_data(), rows, v, out->typed_data(), [](const float* p, int64_t count) {
    __m512 acc = _mm512_setzero_ps();  // 16 terms a lane
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) acc = _mm512_add_ps(acc, _mm512_max_ps(_mm512_loadu_ps(p + i), _mm512_setzero_ps()));
    if (i < count) acc = _mm512_add_ps(acc, _mm512_max_ps(_mm512_maskz_loadu_ps(Lanes(count - i), p + i), _mm512_setzero_ps()));
    return _mm512_reduce_add_ps(acc);
  });
  return ffi::Error::Success();
}

}  // namespace

#include "handlers.inc"
