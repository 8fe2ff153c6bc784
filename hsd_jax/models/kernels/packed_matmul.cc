// x [M, K] times a weight packed once at load, for XLA:CPU through the XLA FFI
// (`hsd_jax.models.cpu_kernel`), result float32 [M, N]:
// * float32 weights packed as [N/16, K, 16]: AVX-512 FMA;
// * bfloat16 weights packed as [N/16, K/2, 16, 2] (the pairs VDPBF16PS multiplies): AVX512-BF16.
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

// One multiply-accumulate step of each element type: x's element (a float, or a pair of bf16 as
// 32 bits) broadcast against one packed step of 16 output columns.
struct F32 {
  using X = float;
  using W = float;
  using V = __m512;
  static constexpr int64_t kStep = 16;  // weight elements per step and block
  static V Load(const W* w) { return _mm512_loadu_ps(w); }
  static V Broadcast(X x) { return _mm512_set1_ps(x); }
  static __m512 Mac(__m512 acc, V x, V w) { return _mm512_fmadd_ps(x, w, acc); }
};

struct Bf16 {
  using X = uint32_t;
  using W = uint16_t;
  using V = __m512bh;
  static constexpr int64_t kStep = 32;
  static V Load(const W* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static V Broadcast(X x) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(x)); }
  static __m512 Mac(__m512 acc, V x, V w) { return _mm512_dpbf16_ps(acc, x, w); }
};

// Rows [m0, m0 + RT) times column blocks [b0, b0 + CB), over all `steps` packed steps.
template <typename E, int RT, int CB>
inline void Tile(const typename E::X* x, int64_t steps, const typename E::W* w, float* out, int64_t n,
                 int64_t m0, int64_t b0) {
  __m512 acc[RT][CB];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = _mm512_setzero_ps();
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
    for (int c = 0; c < CB; ++c) _mm512_storeu_ps(out + (m0 + r) * n + (b0 + c) * 16, acc[r][c]);
}

template <typename E, int RT, int CB>
void Rows(const typename E::X* x, int64_t steps, const typename E::W* w, float* out, int64_t n, int64_t m0,
          int64_t first, int64_t last) {
  int64_t b = first;
  for (; b + CB <= last; b += CB) Tile<E, RT, CB>(x, steps, w, out, n, m0, b);
  for (; b < last; ++b) Tile<E, RT, 1>(x, steps, w, out, n, m0, b);
}

// Column blocks [first, last) of every row: up to 16 rows in one pass over the weights.
template <typename E>
void Blocks(const typename E::X* x, int64_t m, int64_t steps, const typename E::W* w, float* out, int64_t n,
            int64_t first, int64_t last) {
  int64_t r = 0;
  for (; m - r >= 16; r += 16) Rows<E, 16, 1>(x, steps, w, out, n, r, first, last);
  switch (m - r) {
    case 0: break;
    case 1: Rows<E, 1, 8>(x, steps, w, out, n, r, first, last); break;
    case 2: Rows<E, 2, 8>(x, steps, w, out, n, r, first, last); break;
    case 3: Rows<E, 3, 5>(x, steps, w, out, n, r, first, last); break;
    case 4: Rows<E, 4, 4>(x, steps, w, out, n, r, first, last); break;
    case 5: Rows<E, 5, 3>(x, steps, w, out, n, r, first, last); break;
    case 6: Rows<E, 6, 2>(x, steps, w, out, n, r, first, last); break;
    case 7: Rows<E, 7, 2>(x, steps, w, out, n, r, first, last); break;
    case 8: Rows<E, 8, 2>(x, steps, w, out, n, r, first, last); break;
    case 9: Rows<E, 9, 1>(x, steps, w, out, n, r, first, last); break;
    case 10: Rows<E, 10, 1>(x, steps, w, out, n, r, first, last); break;
    case 11: Rows<E, 11, 1>(x, steps, w, out, n, r, first, last); break;
    case 12: Rows<E, 12, 1>(x, steps, w, out, n, r, first, last); break;
    case 13: Rows<E, 13, 1>(x, steps, w, out, n, r, first, last); break;
    case 14: Rows<E, 14, 1>(x, steps, w, out, n, r, first, last); break;
    default: Rows<E, 15, 1>(x, steps, w, out, n, r, first, last); break;
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
  // The cores this process may run on (not the machine's), or HSD_JAX_KERNEL_THREADS.
  static unsigned Threads() {
    if (const char* env = std::getenv("HSD_JAX_KERNEL_THREADS")) return std::max(1, std::atoi(env));
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

// x [M, K'] times w [N/16, K' / per_x, kStep]: per_x is how many weight rows one x element covers
// (a bf16 pair is one 32-bit x element).
template <typename E, ffi::DataType T>
ffi::Error PackedMatmul(ffi::Buffer<T> x, ffi::Buffer<T> w, ffi::ResultBuffer<ffi::F32> out) {
  constexpr int64_t per_x = E::kStep / 16;
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != E::kStep || xd[1] != per_x * wd[1]) {
    return ffi::Error::InvalidArgument("hsd packed matmul: x must be [M, K] and w [N/16, K/g, 16 g]");
  }
  const int64_t m = xd[0], steps = wd[1], blocks = wd[0], n = blocks * 16;
  const auto* xp = reinterpret_cast<const typename E::X*>(x.untyped_data());
  const auto* wp = reinterpret_cast<const typename E::W*>(w.untyped_data());
  float* op = out->typed_data();
  Pool::Get().Run(static_cast<int>(std::min<int64_t>(Pool::Get().size(), blocks)), [&](int t, int threads) {
    const int64_t share = (blocks + threads - 1) / threads;
    const int64_t first = t * share, last = std::min(blocks, first + share);
    if (first < last) Blocks<E>(xp, m, steps, wp, op, n, first, last);
  });
  return ffi::Error::Success();
}

ffi::Error F32MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  return PackedMatmul<F32>(x, w, out);
}

ffi::Error Bf16MatmulImpl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> out) {
  return PackedMatmul<Bf16>(x, w, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HsdF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HsdBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
