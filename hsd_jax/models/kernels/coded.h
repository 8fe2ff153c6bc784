// float32 weights stored as block codes: every run of 32 values along K of one output column is
// exactly fma(d, q, m) for float16 d and m and small integers q (a GGUF Q4_1 block: q in [0, 15];
// a Q8_0 block: q in [-128, 127], m = 0). Decoded here in registers to the same float32 values, and
// multiplied in the float32 kernel's order (one FMA chain per output element, k ascending), so a
// product equals the float32 kernel's on the decoded weights bit for bit, from 0.625 (4-bit) or
// 1.125 (8-bit) bytes a weight against 4. Eight-lane AVX2 code, included by both builds (AVX-512
// implies AVX2), after common.h.
//
// data [N/16, K/32, 64 + 16 * 32 * bits / 8] bytes: for each block of 16 columns and group of 32
// values of k, one contiguous record: the 16 columns' d, then their m (float16, as GGUF stores
// them), then the codes:
//   4 bits: byte 16 j + c holds column c's codes of k = 2 j (low nibble) and 2 j + 1 (high nibble);
//   8 bits: byte 16 k + c holds column c's code of k, as int8.
#pragma once

namespace {

template <int Bits>
struct Codes;

template <>
struct Codes<4> {
  static constexpr int64_t kGroupBytes = 64 + 256;
  // The codes of k = 2 j and 2 j + 1 for columns [8 h, 8 h + 8) as float32.
  static void Widen(const uint8_t* group, int j, int h, __m256& q0, __m256& q1) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(group + 64 + 16 * j + 8 * h)));
    q0 = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
    q1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
  }
};

template <>
struct Codes<8> {
  static constexpr int64_t kGroupBytes = 64 + 512;
  static void Widen(const uint8_t* group, int j, int h, __m256& q0, __m256& q1) {
    const auto* p = reinterpret_cast<const __m128i*>(group + 64 + 32 * j + 8 * h);
    q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p)));
    q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p + 1)));
  }
};

// The record's scales d and m of columns [8 h, 8 h + 8) as float32.
inline void Scales(const uint8_t* group, int h, __m256& d, __m256& m) {
  const auto* scales = reinterpret_cast<const __m128i*>(group) + h;
  d = _mm256_cvtph_ps(_mm_loadu_si128(scales));
  m = _mm256_cvtph_ps(_mm_loadu_si128(scales + 2));
}

// The record's float32 weights of k = 2 j and 2 j + 1 for columns [8 h, 8 h + 8): fma(q, d, m), the
// stored value's single rounding, since d q is exact.
template <int Bits>
inline void Decode(const uint8_t* group, int j, int h, __m256 d, __m256 m, __m256& w0, __m256& w1) {
  Codes<Bits>::Widen(group, j, h, w0, w1);
  w0 = _mm256_fmadd_ps(w0, d, m);
  w1 = _mm256_fmadd_ps(w1, d, m);
}

// Records this far ahead are prefetched, with the non-temporal hint since each is read once a step
// (on Zen 3 T0 measured the same, and neither keeps a draft's weights in L3 across a target step).
// A prefetch past the data's end is only a hint: it never faults, and nothing reads that address.
constexpr int64_t kPrefetchRecords = 6;

template <int Bits>
inline void PrefetchRecord(const uint8_t* record) {
#pragma GCC unroll 9
  for (int64_t line = 0; line < Codes<Bits>::kGroupBytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(record + line), _MM_HINT_NTA);
}

typedef float CodedSums __attribute__((vector_size(32)));  // not __m256, which may alias (see the AVX2 build)

// Rows [0, RT) of x [RT, 32 G] times column block b, each weight decoded in registers as it goes:
// 2 RT sums, both halves' scales, two weights and a broadcast fit AVX2's 16 registers for RT <= 4,
// and with both halves in the inner loop 2 RT chains of FMAs are in flight. Three rows this way cost
// about 1.3x one (measured); a fourth costs more than decoding the record once into L1.
template <int Bits, int RT>
inline void CodedTile(const float* x, int64_t groups, const uint8_t* data, float* out, int64_t n, int64_t b) {
  CodedSums acc[2][RT];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) acc[0][r] = acc[1][r] = CodedSums{};
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = data + (b * groups + g) * Codes<Bits>::kGroupBytes;
    PrefetchRecord<Bits>(group + kPrefetchRecords * Codes<Bits>::kGroupBytes);
    const float* xg = x + 32 * g;
    __m256 d[2], m[2];
    Scales(group, 0, d[0], m[0]);
    Scales(group, 1, d[1], m[1]);
#pragma GCC unroll 2
    for (int j = 0; j < 16; ++j) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256 w0, w1;
        Decode<Bits>(group, j, h, d[h], m[h], w0, w1);
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r) {
          const float* xr = xg + r * groups * 32 + 2 * j;
          acc[h][r] = CodedSums(_mm256_fmadd_ps(_mm256_broadcast_ss(xr + 1), w1,
                                                _mm256_fmadd_ps(_mm256_broadcast_ss(xr), w0, __m256(acc[h][r]))));
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + r * n + b * 16 + 8 * h, __m256(acc[h][r]));
}

// One record's 32 x 16 weights decoded to float32 w[k][column].
template <int Bits>
inline void DecodeGroup(const uint8_t* group, float* w) {
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m256 d, m;
    Scales(group, h, d, m);
#pragma GCC unroll 4
    for (int j = 0; j < 16; ++j) {
      __m256 w0, w1;
      Decode<Bits>(group, j, h, d, m, w0, w1);
      _mm256_store_ps(w + 32 * j + 8 * h, w0);
      _mm256_store_ps(w + 32 * j + 16 + 8 * h, w1);
    }
  }
}

// Rows [0, RT) of x (row stride `stride`, at the group's first k) times decoded weights w[32][16],
// added to the rows' running sums acc[RT][16] in k order.
template <int RT>
inline void RowsOverGroup(const float* x, int64_t stride, const float* w, float* acc) {
  CodedSums a[RT][2];
#pragma GCC unroll 8
  for (int r = 0; r < RT; ++r) {
    a[r][0] = CodedSums(_mm256_loadu_ps(acc + 16 * r));
    a[r][1] = CodedSums(_mm256_loadu_ps(acc + 16 * r + 8));
  }
#pragma GCC unroll 4
  for (int k = 0; k < 32; ++k) {
    const __m256 w0 = _mm256_load_ps(w + 16 * k), w1 = _mm256_load_ps(w + 16 * k + 8);
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * stride + k);
      a[r][0] = CodedSums(_mm256_fmadd_ps(xv, w0, __m256(a[r][0])));
      a[r][1] = CodedSums(_mm256_fmadd_ps(xv, w1, __m256(a[r][1])));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RT; ++r) {
    _mm256_storeu_ps(acc + 16 * r, __m256(a[r][0]));
    _mm256_storeu_ps(acc + 16 * r + 8, __m256(a[r][1]));
  }
}

constexpr int64_t kCodedChunk = 2, kRegisterRows = 3, kDecodedRows = 6;

// Up to 3 rows decode each weight in registers as they go; more rows decode each record once into
// L1 and run over it in tiles of 3 to 6 rows, the rows shared out evenly (8 as 4 + 4: 8 FMA chains
// in flight in each tile, where 6 + 2 left the second with 4), their sums kept in L1 between records.
template <int Bits>
void CodedBlocks(const float* x, int64_t m, int64_t groups, const uint8_t* data, float* out, int64_t n,
                 int64_t first, int64_t last) {
  if (m <= kRegisterRows) {
    for (int64_t b = first; b < last; ++b) {
      switch (m) {
        case 1: CodedTile<Bits, 1>(x, groups, data, out, n, b); break;
        case 2: CodedTile<Bits, 2>(x, groups, data, out, n, b); break;
        default: CodedTile<Bits, 3>(x, groups, data, out, n, b); break;  // m >= 1: CodedMatmulImpl returns on none
      }
    }
    return;
  }
  const int64_t k = 32 * groups, tiles = (m + kDecodedRows - 1) / kDecodedRows;
  std::vector<float> acc(m * 16);
  alignas(32) float w[32 * 16];
  for (int64_t b = first; b < last; ++b) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* group = data + (b * groups + g) * Codes<Bits>::kGroupBytes;
      PrefetchRecord<Bits>(group + kPrefetchRecords * Codes<Bits>::kGroupBytes);
      DecodeGroup<Bits>(group, w);
      for (int64_t t = 0, r0 = 0; t < tiles; ++t) {
        const int64_t rows = (m - r0) / (tiles - t);
        const float* xr = x + r0 * k + 32 * g;
        float* ar = acc.data() + r0 * 16;
        switch (rows) {
          case 3: RowsOverGroup<3>(xr, k, w, ar); break;
          case 4: RowsOverGroup<4>(xr, k, w, ar); break;
          case 5: RowsOverGroup<5>(xr, k, w, ar); break;
          default: RowsOverGroup<6>(xr, k, w, ar); break;
        }
        r0 += rows;
      }
    }
    for (int64_t r = 0; r < m; ++r) std::memcpy(out + r * n + b * 16, acc.data() + r * 16, 16 * sizeof(float));
  }
}

// x float32 [M, K] times the block-coded weight data (as above; K = 32 G): out [M, N].
ffi::Error CodedMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> data, ffi::ResultBuffer<ffi::F32> out,
                           int64_t bits) {
  const auto xd = x.dimensions();
  const auto dd = data.dimensions();
  const int64_t group_bytes = bits == 4 ? Codes<4>::kGroupBytes : Codes<8>::kGroupBytes;
  if ((bits != 4 && bits != 8) || xd.size() != 2 || dd.size() != 3 || dd[2] != group_bytes || xd[1] != 32 * dd[1]) {
    return ffi::Error::InvalidArgument(
        "hsd coded matmul: x must be [M, 32 G] and the data [N/16, G, 64 + 16 * 32 * bits / 8] (bits 4 or 8)");
  }
  const int64_t m = xd[0], groups = dd[1], blocks = dd[0], n = blocks * 16;
  const auto od = out->dimensions();
  if (od.size() != 2 || od[0] != m || od[1] != n) {
    return ffi::Error::InvalidArgument("hsd coded matmul: the result must be [M, 16 * (N/16)]");
  }
  if (m == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const uint8_t* dp = data.typed_data();
  float* op = out->typed_data();
  Pool::Get().Run(blocks, ColumnChunk(blocks, kCodedChunk), [&](int64_t first, int64_t last) {
    if (bits == 4) CodedBlocks<4>(xp, m, groups, dp, op, n, first, last);
    else CodedBlocks<8>(xp, m, groups, dp, op, n, first, last);
  });
  return ffi::Error::Success();
}

}  // namespace
