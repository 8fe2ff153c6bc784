// x [M, K] bf16 times a bf16 weight packed as [N/16, K/2, 16, 2] -> out [M, N] float32, on
// AVX512-BF16 (VDPBF16PS), for XLA:CPU through the XLA FFI (`hsd_jax.models.cpu_kernel`).
//
// Each weight element is read once per call for up to 16 rows (every row's accumulators stay in
// registers), so a k-token pass costs about what one token does, and the weights are read in
// their packed order, one contiguous stream per 16 output columns. Every output element is one
// accumulator that adds the same products in the same order whatever M is: a row's result does
// not depend on the other rows (a one-token step and a k-token pass agree bit for bit).
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <int RT, int CB>
inline void Tile(const uint32_t* x, int64_t k2, const uint16_t* w, float* out, int64_t n, int64_t m0,
                 int64_t b0) {
  __m512 acc[RT][CB];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = _mm512_setzero_ps();
  const uint16_t* wp[CB];
  for (int c = 0; c < CB; ++c) wp[c] = w + (b0 + c) * k2 * 32;
  for (int64_t kp = 0; kp < k2; ++kp) {
    __m512bh wv[CB];
    for (int c = 0; c < CB; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(wp[c] + kp * 32);
    for (int r = 0; r < RT; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[(m0 + r) * k2 + kp]));
      for (int c = 0; c < CB; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) _mm512_storeu_ps(out + (m0 + r) * n + (b0 + c) * 16, acc[r][c]);
}

template <int RT, int CB>
void Rows(const uint32_t* x, int64_t k2, const uint16_t* w, float* out, int64_t n, int64_t m0,
          int64_t first, int64_t last) {
  int64_t b = first;
  for (; b + CB <= last; b += CB) Tile<RT, CB>(x, k2, w, out, n, m0, b);
  for (; b < last; ++b) Tile<RT, 1>(x, k2, w, out, n, m0, b);
}

// Column blocks [first, last) of every row: up to 16 rows in one pass over the weights.
void Blocks(const uint32_t* x, int64_t m, int64_t k2, const uint16_t* w, float* out, int64_t n,
            int64_t first, int64_t last) {
  int64_t r = 0;
  for (; m - r >= 16; r += 16) Rows<16, 1>(x, k2, w, out, n, r, first, last);
  switch (m - r) {
    case 0: break;
    case 1: Rows<1, 8>(x, k2, w, out, n, r, first, last); break;
    case 2: Rows<2, 8>(x, k2, w, out, n, r, first, last); break;
    case 3: Rows<3, 5>(x, k2, w, out, n, r, first, last); break;
    case 4: Rows<4, 4>(x, k2, w, out, n, r, first, last); break;
    case 5: Rows<5, 3>(x, k2, w, out, n, r, first, last); break;
    case 6: Rows<6, 2>(x, k2, w, out, n, r, first, last); break;
    case 7: Rows<7, 2>(x, k2, w, out, n, r, first, last); break;
    case 8: Rows<8, 2>(x, k2, w, out, n, r, first, last); break;
    case 9: Rows<9, 1>(x, k2, w, out, n, r, first, last); break;
    case 10: Rows<10, 1>(x, k2, w, out, n, r, first, last); break;
    case 11: Rows<11, 1>(x, k2, w, out, n, r, first, last); break;
    case 12: Rows<12, 1>(x, k2, w, out, n, r, first, last); break;
    case 13: Rows<13, 1>(x, k2, w, out, n, r, first, last); break;
    case 14: Rows<14, 1>(x, k2, w, out, n, r, first, last); break;
    default: Rows<15, 1>(x, k2, w, out, n, r, first, last); break;
  }
}

// Workers that spin briefly between calls (a decode step makes ~120 calls a few microseconds
// apart; waking a sleeping thread each time would cost more than the work) and then sleep.
class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool(Threads());
    return *pool;
  }
  // The cores this process may run on (not the machine's), or HSD_JAX_BF16_THREADS.
  static unsigned Threads() {
    if (const char* env = std::getenv("HSD_JAX_BF16_THREADS")) return std::max(1, std::atoi(env));
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs task(i, n) for i in [0, n) on n threads (the caller is thread 0) and waits for all. A call
  // made while another one runs (XLA may run two custom calls at once) runs alone on its thread.
  template <typename F>
  void Run(int n, F&& task) {
    n = std::min(n, size());
    std::unique_lock<std::mutex> busy(running_, std::try_to_lock);
    if (n <= 1 || !busy.owns_lock()) return task(0, 1);
    std::function<void(int, int)> job = task;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      active_ = n;
      pending_.store(n - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    task(0, n);
    while (pending_.load(std::memory_order_acquire) > 0) _mm_pause();
  }

 private:
  explicit Pool(unsigned threads) {
    for (unsigned i = 1; i < threads; ++i) workers_.emplace_back([this, i] { Loop(static_cast<int>(i)); });
  }
  void Loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t now = generation_.load(std::memory_order_acquire);
      for (int spin = 0; now == seen && spin < 20000; ++spin) {
        _mm_pause();
        now = generation_.load(std::memory_order_acquire);
      }
      if (now == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      std::function<void(int, int)>* job;
      int active;
      {  // the generation, its job and its width are published together under the lock
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
        active = active_;
      }
      if (index < active) {
        (*job)(index, active);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }
  std::vector<std::thread> workers_;
  std::mutex running_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::function<void(int, int)>* job_ = nullptr;
  int active_ = 0;
};

ffi::Error Bf16MatmulImpl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != 32 || xd[1] != 2 * wd[1]) {
    return ffi::Error::InvalidArgument("hsd_bf16_matmul: x must be [M, 2 K2] and w [N/16, K2, 32]");
  }
  const int64_t m = xd[0], k2 = wd[1], blocks = wd[0], n = blocks * 16;
  const auto* xp = reinterpret_cast<const uint32_t*>(x.typed_data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* op = out->typed_data();
  Pool::Get().Run(static_cast<int>(std::min<int64_t>(Pool::Get().size(), blocks)), [&](int t, int threads) {
    const int64_t share = (blocks + threads - 1) / threads;
    const int64_t first = t * share, last = std::min(blocks, first + share);
    if (first < last) Blocks(xp, m, k2, wp, op, n, first, last);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HsdBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
