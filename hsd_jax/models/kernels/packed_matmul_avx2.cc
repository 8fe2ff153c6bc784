// The kernels of packed_matmul.cc for x86 CPUs with AVX2 and FMA but not the AVX-512 subset that
// file needs (AMD Zen 2 and 3, Intel's client cores since Alder Lake, older servers): the same FFI
// targets, the same packed weight layouts, the same contract. Eight float32 lanes a register, 16
// registers:
// * float32 weights [N/16, K, 16] and bfloat16 weights [N/16, K/2, 16, 2]: each block of 16
//   columns is two registers of 8; a bf16 pair (k, k+1) is widened to two float32 vectors (the
//   16-bit shift that makes a bf16 a float32, exactly) and multiplied with FMA, k first;
// * int8 weights [N/16, K/4, 16, 4]: each quad sign-extended to 16 bits and multiplied in pairs by
//   VPMADDWD against x quantised to int8 as packed_matmul.cc does: exact int32 sums, so the same
//   products as there.
// Rows run in groups of up to 4 (8 accumulators), so a k-token pass reads each weight from memory
// once. Every output element adds the same products in the same order whatever the number of rows,
// so a one-token step and a k-token pass agree bit for bit; float32 sums are ordered differently
// from packed_matmul.cc's, so the two builds may differ in the last bits of a float result.
#include "common.h"
#include "coded.h"

namespace {

// Lanes [0, count) of 8 set (a mask for _mm256_maskload_ps; none for count <= 0).
inline __m256i Lanes(int64_t count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(count, 0, 8))), index);
}

inline __m256 LoadFirst(const float* p, int64_t count) {
  return count >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, Lanes(count));
}

// The lanes' sum in one fixed order: halves, then quarters, then pairs.
inline float Sum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float Max(__m256 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Each element type's packed step: kPairs values of k for 16 columns; Widen gives the float32
// weights of value j for columns [8 half, 8 half + 8).
struct F32 {
  using W = float;
  static constexpr int64_t kStep = 16, kPairs = 1;
  static __m256 Widen(const W* w, int half, int) { return _mm256_loadu_ps(w + 8 * half); }
};

struct Bf16 {
  using W = uint16_t;
  static constexpr int64_t kStep = 32, kPairs = 2;
  static __m256 Widen(const W* w, int half, int j) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * half));
    return _mm256_castsi256_ps(j == 0 ? _mm256_slli_epi32(pairs, 16)
                                      : _mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

// Eight float32 sums. Not __m256, which may alias any memory: GCC then keeps an array of them in
// memory as well as in registers, a store per accumulator and step.
typedef float Sums __attribute__((vector_size(32)));
typedef long long Ints __attribute__((vector_size(32)));

// Rows [m0, m0 + RT) times column blocks [b0, b0 + CB): x holds steps * kPairs floats a row.
template <typename E, int RT, int CB>
inline void Tile(const float* x, int64_t steps, const typename E::W* w, float* out, int64_t n, int64_t m0,
                 int64_t b0) {
  Sums acc[RT][2 * CB];  // [row][2 block + half]; every loop over it unrolled, or GCC keeps it in memory
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < 2 * CB; ++c) acc[r][c] = Sums{};
  const typename E::W* wp[CB];
  for (int c = 0; c < CB; ++c) wp[c] = w + (b0 + c) * steps * E::kStep;
  const float* xp[RT];
  for (int r = 0; r < RT; ++r) xp[r] = x + (m0 + r) * steps * E::kPairs;
  for (int64_t s = 0; s < steps; ++s) {
    if constexpr (RT <= 2) {  // each widened weight used by every row in turn
#pragma GCC unroll 16
      for (int c = 0; c < 2 * CB; ++c) {
#pragma GCC unroll 2
        for (int j = 0; j < E::kPairs; ++j) {
          const __m256 wv = E::Widen(wp[c / 2] + s * E::kStep, c % 2, j);
#pragma GCC unroll 16
          for (int r = 0; r < RT; ++r) {
            acc[r][c] = Sums(_mm256_fmadd_ps(_mm256_broadcast_ss(xp[r] + s * E::kPairs + j), wv, __m256(acc[r][c])));
          }
        }
      }
    } else {  // the step's widened weights held in registers, each row's x broadcast in turn
      __m256 wv[2 * CB][E::kPairs];
#pragma GCC unroll 16
      for (int c = 0; c < 2 * CB; ++c)
#pragma GCC unroll 2
        for (int j = 0; j < E::kPairs; ++j) wv[c][j] = E::Widen(wp[c / 2] + s * E::kStep, c % 2, j);
#pragma GCC unroll 16
      for (int r = 0; r < RT; ++r) {
#pragma GCC unroll 2
        for (int j = 0; j < E::kPairs; ++j) {
          const __m256 xv = _mm256_broadcast_ss(xp[r] + s * E::kPairs + j);
#pragma GCC unroll 16
          for (int c = 0; c < 2 * CB; ++c) acc[r][c] = Sums(_mm256_fmadd_ps(xv, wv[c][j], __m256(acc[r][c])));
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < 2 * CB; ++c) _mm256_storeu_ps(out + (m0 + r) * n + b0 * 16 + 8 * c, __m256(acc[r][c]));
}

template <typename E, int RT, int CB>
void Span(const float* x, int64_t steps, const typename E::W* w, float* out, int64_t n, int64_t m0, int64_t b,
          int64_t end) {
  for (; b + CB <= end; b += CB) Tile<E, RT, CB>(x, steps, w, out, n, m0, b);
  if constexpr (CB > 1) {
    if (b < end) Span<E, RT, CB / 2>(x, steps, w, out, n, m0, b, end);
  }
}

// A group of 1 to 4 rows in tiles whose accumulators, weights and broadcast x fit 16 registers.
template <typename E>
void Group(const float* x, int64_t steps, const typename E::W* w, float* out, int64_t n, int64_t m0, int64_t rows,
           int64_t b, int64_t end) {
  switch (rows) {
    case 1: return Span<E, 1, 4>(x, steps, w, out, n, m0, b, end);
    case 2: return Span<E, 2, 2>(x, steps, w, out, n, m0, b, end);
    case 3: return Span<E, 3, 1>(x, steps, w, out, n, m0, b, end);
    default: return Span<E, 4, 1>(x, steps, w, out, n, m0, b, end);
  }
}

// Column blocks [first, last) of every row, in groups of up to 4 rows over spans of 12 blocks (as
// packed_matmul.cc's Blocks). Pool chunks are multiples of 4 blocks: the tiles' widths divide 4.
constexpr int64_t kGroupRows = 4, kSpanBlocks = 12, kChunkBlocks = 4;
template <typename E>
void Blocks(const float* x, int64_t m, int64_t steps, const typename E::W* w, float* out, int64_t n, int64_t first,
            int64_t last) {
  RowGroupsBySpan(m, kGroupRows, kSpanBlocks, first, last, [&](int64_t m0, int64_t rows, int64_t b, int64_t end) {
    Group<E>(x, steps, w, out, n, m0, rows, b, end);
  });
}

template <typename E>
void RunPacked(const float* x, int64_t m, int64_t steps, const typename E::W* w, int64_t blocks, float* out) {
  Pool::Get().Run(blocks, ColumnChunk(blocks, kChunkBlocks), [&](int64_t first, int64_t last) {
    Blocks<E>(x, m, steps, w, out, blocks * 16, first, last);
  });
}

ffi::Error F32MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  if (!PackedShapes(x, w, 1)) return F32ShapeError();
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  RunPacked<F32>(x.typed_data(), xd[0], wd[1], w.typed_data(), wd[0], out->typed_data());
  return ffi::Error::Success();
}

// float32 rounded to the nearest bfloat16, ties to even, as XLA's convert does (a NaN stays NaN),
// and widened back to float32.
inline __m256 RoundToBf16(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(up, high));
  const __m256 quiet = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, high), _mm256_set1_epi32(0x00400000)));
  return _mm256_blendv_ps(rounded, quiet, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// x float32 [M, K] rounded to bfloat16 here (zero past K), times w [N/16, ceil(K/2), 32].
ffi::Error Bf16MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> out) {
  if (!PackedShapes(x, w, 2)) return Bf16ShapeError();
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const int64_t m = xd[0], k = xd[1], steps = wd[1], width = 2 * steps;
  std::vector<float> rounded(m * width + 8);
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x.typed_data() + r * k;
    for (int64_t i = 0; i < width; i += 8) {
      _mm256_storeu_ps(rounded.data() + r * width + i, RoundToBf16(LoadFirst(row + i, k - i)));
    }
  }
  RunPacked<Bf16>(rounded.data(), m, steps, reinterpret_cast<const uint16_t*>(w.untyped_data()), wd[0],
                  out->typed_data());
  return ffi::Error::Success();
}

// Rows [m0, m0 + RT) of quantised x (steps quads of int16 pairs a row, as int32 words) times the
// int8 block b0: int32 sums stored in out's place.
template <int RT>
inline void S8Tile(const int32_t* x, int64_t steps, const int8_t* w, float* out, int64_t n, int64_t m0, int64_t b0) {
  Ints acc[RT][4];  // acc[r][h]: columns 4 h .. 4 h + 3, two int32 partial sums each (pairs (0, 1), (2, 3))
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) acc[r][h] = Ints{};
  for (int64_t s = 0; s < steps; ++s) {
    __m256i xv[RT];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {  // x's quad (q0, q1, q2, q3) as int16 pairs (q0, q1), (q2, q3), repeated
      xv[r] = _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + ((m0 + r) * steps + s) * 2)));
    }
    const int8_t* step = w + (b0 * steps + s) * 64;
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(step + 16 * h)));
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) acc[r][h] = Ints(_mm256_add_epi32(__m256i(acc[r][h]), _mm256_madd_epi16(wv, xv[r])));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // add each column's two partial sums: columns 8 h .. 8 h + 7
      const __m256i a = __m256i(acc[r][2 * h]), b = __m256i(acc[r][2 * h + 1]);
      const __m256i sums = _mm256_hadd_epi32(a, b);  // a0+a1 a2+a3 b0+b1 b2+b3 | a4+a5 a6+a7 b4+b5 b6+b7
      const __m256i ordered = _mm256_permute4x64_epi64(sums, 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + r) * n + b0 * 16 + 8 * h), ordered);
    }
}

// Groups of up to 2 rows: 8 accumulators a row and block.
void S8Blocks(const int32_t* x, int64_t m, int64_t steps, const int8_t* w, float* out, int64_t n, int64_t first,
              int64_t last) {
  RowGroupsBySpan(m, 2, kSpanBlocks, first, last, [&](int64_t m0, int64_t rows, int64_t b, int64_t end) {
    for (; b < end; ++b) {
      if (rows == 2) S8Tile<2>(x, steps, w, out, n, m0, b);
      else S8Tile<1>(x, steps, w, out, n, m0, b);
    }
  });
}

// x float32 [M, K] quantised row by row as packed_matmul.cc's S8MatmulImpl does (scale = absmax /
// 127, 1 for a zero row; q = round-half-even(x / scale) clipped to +-127), times int8 weights
// [N/16, ceil(K/4), 64] with per-column scales [N]: float(sum q_x q_w) * scale_x * scale_w. The
// int32 sums are exact while 127 * 127 * K < 2^31, so the results equal that file's.
ffi::Error S8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> w_scale,
                        ffi::ResultBuffer<ffi::F32> out) {
  if (!S8Shapes(x, w, w_scale)) return S8ShapeError();
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const int64_t m = xd[0], k = xd[1], steps = wd[1], blocks = wd[0], n = blocks * 16;
  const int64_t columns = w_scale.dimensions()[0];
  std::vector<int16_t> xq(m * steps * 4, 0);
  std::vector<float> x_scale(m);
  for (int64_t r = 0; r < m; ++r) {  // 8 lanes at a time, each lane as the scalar rule computes it
    const float* row = x.typed_data() + r * k;
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, LoadFirst(row + i, k - i)));
    const float absmax = Max(amax);
    const float scale = absmax > 0.f ? absmax / 127.f : 1.f;
    const __m256 divisor = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    for (int64_t i = 0; i < k; i += 8) {
      const __m256 q = _mm256_round_ps(_mm256_div_ps(LoadFirst(row + i, k - i), divisor),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
      alignas(32) int32_t qi[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(qi), _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, q))));
      for (int64_t j = 0; j < 8 && i + j < k; ++j) xq[r * steps * 4 + i + j] = static_cast<int16_t>(qi[j]);
    }
    x_scale[r] = scale;
  }
  const auto* xs = reinterpret_cast<const int32_t*>(xq.data());
  const auto* wp = reinterpret_cast<const int8_t*>(w.untyped_data());
  const float* ws = w_scale.typed_data();
  float* op = out->typed_data();
  Pool::Get().Run(blocks, ColumnChunk(blocks, kChunkBlocks), [&](int64_t first, int64_t last) {
    S8Blocks(xs, m, steps, wp, op, n, first, last);
    for (int64_t r = 0; r < m; ++r) {  // the epilogue of these columns, in place: (sum * scale_x) * scale_w
      float* row = op + r * n;
      const __m256 row_scale = _mm256_set1_ps(x_scale[r]);
      for (int64_t c = first * 16; c < last * 16; c += 8) {
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c)));
        const __m256 scaled = _mm256_mul_ps(_mm256_mul_ps(sums, row_scale), LoadFirst(ws + c, columns - c));
        _mm256_storeu_ps(row + c, scaled);
      }
    }
  });
  return ffi::Error::Success();
}

// exp on 8 lanes: packed_matmul.cc's Exp (2^n * p(r), the same polynomial; for x <= 0, where its
// callers use it, the same bits), with 2^n made in the exponent field; exact 0 below -87.3, e^88
// above 88.
inline __m256 Exp(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

// A head's scores [size] replaced by their weights e^(score - top) (0 where masked), and their
// total: summed in 8 lanes over the positions in blocks of 8, then across the lanes, then the
// positions past the last full block in order.
inline float WeightsInPlace(float* sg, const bool* mask, int64_t size, float top) {
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sum = _mm256_setzero_ps();
  int64_t s0 = 0;
  for (; s0 + 8 <= size; s0 += 8) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + s0)));
    const __m256 lanes = _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256()));
    if (_mm256_testz_ps(lanes, lanes)) continue;
    const __m256 e = _mm256_and_ps(lanes, Exp(_mm256_sub_ps(_mm256_loadu_ps(sg + s0), shift)));
    _mm256_storeu_ps(sg + s0, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = Sum(sum);
  for (; s0 < size; ++s0) {
    if (!mask[s0]) continue;
    alignas(32) float e[8];
    _mm256_store_ps(e, Exp(_mm256_set1_ps(sg[s0] - top)));
    sg[s0] = e[0];
    total += e[0];
  }
  return total;
}

// One query row's heads of one KV group: out[g] = softmax(q[g] . k[s] * scale over the valid s) . v,
// head by head (q[g] held in registers). kChunks: d / 8 known at compile time, or 0: any d <= 256.
// A row's result depends only on its own q, mask row and the cache: not on the other rows.
template <int kChunks>
void AttendGroup(const float* q, const float* k, const float* v, const bool* mask, float* out, int64_t groups,
                 int64_t size, int64_t d, int64_t kv_stride, float scale, float* scores) {
  const int64_t chunks = kChunks ? kChunks : (d + 7) / 8;
  const __m256i tail = Lanes(d % 8 ? d % 8 : 8);
  auto load = [&](const float* p, int64_t c) {
    return kChunks || c != chunks - 1 ? _mm256_loadu_ps(p + 8 * c) : _mm256_maskload_ps(p + 8 * c, tail);
  };
  for (int64_t g = 0; g < groups; ++g) {
    const float* qg = q + g * d;
    Sums qv[32];
#pragma GCC unroll 32
    for (int64_t c = 0; c < chunks; ++c) qv[c] = Sums(load(qg, c));
    float top = -INFINITY;
    for (int64_t s = 0; s < size; ++s) {
      if (!mask[s]) continue;
      __m256 acc = _mm256_setzero_ps();
#pragma GCC unroll 32
      for (int64_t c = 0; c < chunks; ++c) acc = _mm256_fmadd_ps(__m256(qv[c]), load(k + s * kv_stride, c), acc);
      scores[s] = Sum(acc) * scale;
      top = std::max(top, scores[s]);
    }
    const float total = WeightsInPlace(scores, mask, size, top);
    Sums acc[32];
#pragma GCC unroll 32
    for (int64_t c = 0; c < chunks; ++c) acc[c] = Sums{};
    for (int64_t s = 0; s < size; ++s) {
      if (!mask[s]) continue;
      const __m256 wv = _mm256_broadcast_ss(scores + s);
#pragma GCC unroll 32
      for (int64_t c = 0; c < chunks; ++c) acc[c] = Sums(_mm256_fmadd_ps(wv, load(v + s * kv_stride, c), __m256(acc[c])));
    }
    const __m256 norm = _mm256_set1_ps(total > 0.f ? 1.f / total : 0.f);
#pragma GCC unroll 32
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256 o = _mm256_mul_ps(__m256(acc[c]), norm);
      if (kChunks || c != chunks - 1) _mm256_storeu_ps(out + g * d + 8 * c, o);
      else _mm256_maskstore_ps(out + g * d + 8 * c, tail, o);
    }
  }
}

// AttendGroup for head width 64 and up to 3 heads a KV group, all heads in each pass over the cache:
// each cached key and value is loaded once for the group, not once per head. Scores each add two
// half sums (chunks 0-3, 4-7); the weighted sum of v runs in two passes (columns 0-31, 32-63) so
// that the group's accumulators fit 16 registers.
template <int kGroups>
void AttendGroup64(const float* q, const float* k, const float* v, const bool* mask, float* out, int64_t size,
                   int64_t kv_stride, float scale, float* scores) {
  float top[kGroups];
  for (int g = 0; g < kGroups; ++g) top[g] = -INFINITY;
  for (int64_t s = 0; s < size; ++s) {
    if (!mask[s]) continue;
    Sums kv[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) kv[c] = Sums(_mm256_loadu_ps(k + s * kv_stride + 8 * c));
#pragma GCC unroll 4
    for (int g = 0; g < kGroups; ++g) {
      __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(q + 64 * g), __m256(kv[0]));
      __m256 hi = _mm256_mul_ps(_mm256_loadu_ps(q + 64 * g + 32), __m256(kv[4]));
#pragma GCC unroll 4
      for (int c = 1; c < 4; ++c) {
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(q + 64 * g + 8 * c), __m256(kv[c]), lo);
        hi = _mm256_fmadd_ps(_mm256_loadu_ps(q + 64 * g + 32 + 8 * c), __m256(kv[4 + c]), hi);
      }
      const float score = Sum(_mm256_add_ps(lo, hi)) * scale;
      scores[g * size + s] = score;
      top[g] = std::max(top[g], score);
    }
  }
  float total[kGroups];
  for (int g = 0; g < kGroups; ++g) total[g] = WeightsInPlace(scores + g * size, mask, size, top[g]);
  for (int half = 0; half < 2; ++half) {
    Sums acc[kGroups][4];
#pragma GCC unroll 4
    for (int g = 0; g < kGroups; ++g)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[g][c] = Sums{};
    for (int64_t s = 0; s < size; ++s) {
      if (!mask[s]) continue;
      const float* vs = v + s * kv_stride + 32 * half;
#pragma GCC unroll 4
      for (int g = 0; g < kGroups; ++g) {
        const __m256 w = _mm256_broadcast_ss(scores + g * size + s);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[g][c] = Sums(_mm256_fmadd_ps(w, _mm256_loadu_ps(vs + 8 * c), __m256(acc[g][c])));
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < kGroups; ++g) {
      const __m256 norm = _mm256_set1_ps(total[g] > 0.f ? 1.f / total[g] : 0.f);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + 64 * g + 32 * half + 8 * c, _mm256_mul_ps(__m256(acc[g][c]), norm));
    }
  }
}

// q [B, T, H, D]; k, v: the whole cache [L, B, S, H_kv, D], of which layer `layer` is read in place;
// mask [B, T, S] -> out [B, T, H, D]. Heads of one KV group are adjacent in q (H = H_kv * G).
ffi::Error AttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                         ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out, int64_t layer) {
  AttentionShape shape;
  if (!ReadAttentionShape(q, k, mask, layer, shape)) return AttentionShapeError();
  const auto attend = shape.d == 64 ? AttendGroup<8> : shape.d == 128 ? AttendGroup<16> : AttendGroup<0>;
  using Grouped = void (*)(const float*, const float*, const float*, const bool*, float*, int64_t, int64_t, float,
                           float*);
  const Grouped grouped = shape.d != 64 ? nullptr
                          : shape.groups == 1 ? AttendGroup64<1>
                          : shape.groups == 2 ? AttendGroup64<2>
                          : shape.groups == 3 ? AttendGroup64<3>
                                              : nullptr;
  ForEachAttentionTask(shape, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), out->typed_data(),
                       [&](const AttentionTask& t, float* scores) {
                         if (grouped) {
                           grouped(t.q, t.k, t.v, t.mask, t.out, shape.size, shape.kv_stride, shape.scale, scores);
                         } else {
                           attend(t.q, t.k, t.v, t.mask, t.out, shape.groups, shape.size, shape.d, shape.kv_stride,
                                  shape.scale, scores);
                         }
                       });
  return ffi::Error::Success();
}

// x [..., D] -> out [...]: each row summed in 8 lanes, in order, then across the lanes.
ffi::Error RowSumsImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  int64_t rows, d;
  if (!AsRows(x, rows, d)) return ffi::Error::InvalidArgument("hsd row sums: x must be [..., D], D >= 1");
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x.typed_data() + r * d;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) acc = _mm256_add_ps(acc, LoadFirst(row + i, d - i));
    out->typed_data()[r] = Sum(acc);
  }
  return ffi::Error::Success();
}

// The largest of a row's v >= 1 values, and whether any is NaN.
inline float RowMax(const float* row, int64_t v, bool& nan) {
  __m256 top = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
  for (int64_t i = 0; i < v; i += 8) {
    const __m256 lanes = _mm256_castsi256_ps(Lanes(v - i));
    const __m256 y = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), LoadFirst(row + i, v - i), lanes);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
    top = _mm256_max_ps(top, y);
  }
  nan = _mm256_movemask_ps(unordered) != 0;
  return Max(top);
}

// x [..., V] -> out [...] int32: each row's first index of its largest element, a NaN counting as
// the largest (jnp.argmax's answer, exactly).
ffi::Error ArgmaxImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  int64_t rows, v;
  if (!AsRows(x, rows, v)) return ffi::Error::InvalidArgument("hsd argmax: x must be [..., V], V >= 1");
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x.typed_data() + r * v;
    bool nan;
    const float largest = RowMax(row, v, nan);
    int64_t found = 0;
    if (nan) {  // the first NaN
      while (!std::isnan(row[found])) ++found;
    } else {
      const __m256 top = _mm256_set1_ps(largest);
      int hit = 0;
      int64_t i = 0;
      for (; i < v; i += 8) {
        hit = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(LoadFirst(row + i, v - i), top, _CMP_EQ_OQ),
                                               _mm256_castsi256_ps(Lanes(v - i))));
        if (hit) break;
      }
      found = i + __builtin_ctz(hit);
    }
    out->typed_data()[r] = static_cast<int32_t>(found);
  }
  return ffi::Error::Success();
}

// sum += x in float64 lanes (packed_matmul.cc's AddWide).
inline void AddWide(__m256d& sum, __m256 x) {
  sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
  sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
}

// x [R, V] -> out [R, V]: softmax(x / temperature) of each row, as packed_matmul.cc's SoftmaxImpl
// computes it (float32 partial sums of 16 terms a lane, then float64).
ffi::Error SoftmaxImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out, float temperature) {
  int64_t rows, v;
  if (!AsRows(x, rows, v)) return ffi::Error::InvalidArgument("hsd softmax: x must be [..., V], V >= 1");
  const __m256 t = _mm256_set1_ps(temperature);
  const bool scaled = temperature != 1.0f;  // x / 1 is x
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x.typed_data() + r * v;
    float* o = out->typed_data() + r * v;
    bool nan;
    const float largest = RowMax(row, v, nan) / temperature;
    if (nan || !std::isfinite(largest)) {
      std::fill(o, o + v, NAN);
      continue;
    }
    const __m256 shift = _mm256_set1_ps(largest);
    __m256d sum = _mm256_setzero_pd();
    __m256 part = _mm256_setzero_ps();
    int64_t i;
    for (i = 0; i + 8 <= v; i += 8) {
      const __m256 y = scaled ? _mm256_div_ps(_mm256_loadu_ps(row + i), t) : _mm256_loadu_ps(row + i);
      const __m256 e = Exp(_mm256_sub_ps(y, shift));
      _mm256_storeu_ps(o + i, e);
      part = _mm256_add_ps(part, e);
      if ((i / 8) % 16 == 15) {
        AddWide(sum, part);
        part = _mm256_setzero_ps();
      }
    }
    AddWide(sum, part);
    const __m256i tail = Lanes(v - i);
    if (i < v) {
      const __m256 e = _mm256_and_ps(_mm256_castsi256_ps(tail),
                                     Exp(_mm256_sub_ps(_mm256_div_ps(_mm256_maskload_ps(row + i, tail), t), shift)));
      _mm256_maskstore_ps(o + i, tail, e);
      AddWide(sum, e);
    }
    const __m128d half = _mm_add_pd(_mm256_castpd256_pd128(sum), _mm256_extractf128_pd(sum, 1));
    const double total = _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
    const __m256 inverse = _mm256_set1_ps(static_cast<float>(1.0 / total));
    for (i = 0; i + 8 <= v; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(o + i), inverse));
    if (i < v) _mm256_maskstore_ps(o + i, tail, _mm256_mul_ps(_mm256_maskload_ps(o + i, tail), inverse));
  }
  return ffi::Error::Success();
}

// mass [R, V], uniforms [R, 2] -> out [R] int32: packed_matmul.cc's SampleImpl (a block of 256
// tokens with the first uniform, a token inside it with the second; a block's mass summed in
// float32 lanes, the running sums in float64).
ffi::Error SampleImpl(ffi::Buffer<ffi::F32> mass, ffi::Buffer<ffi::F32> uniforms, ffi::ResultBuffer<ffi::S32> out) {
  int64_t rows, v;
  if (!AsRows(mass, rows, v)) return ffi::Error::InvalidArgument("hsd sample: mass must be [..., V], V >= 1");
  if (uniforms.element_count() != 2 * rows) return ffi::Error::InvalidArgument("hsd sample: uniforms must be [..., 2]");
  SampleRows(mass.typed_data(), uniforms.typed_data(), rows, v, out->typed_data(), [](const float* p, int64_t count) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < count; i += 8) acc = _mm256_add_ps(acc, _mm256_max_ps(LoadFirst(p + i, count - i), _mm256_setzero_ps()));
    return Sum(acc);
  });
  return ffi::Error::Success();
}

}  // namespace

#include "handlers.inc"
