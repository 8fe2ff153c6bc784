// What the kernel builds for each instruction set (packed_matmul.cc: AVX-512; packed_matmul_avx2.cc:
// AVX2 and FMA) share: the thread pool, row shapes, the sampler's inversion step and the bf16
// embedding rows (plain loads). Included once by each build, before its own kernels.
#pragma once
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Workers that spin briefly between calls (a decode step makes ~200 calls a few microseconds
// apart; waking a sleeping thread each time would cost more than the work) and then sleep. A call's
// items are claimed in chunks from one counter by whichever threads run: the caller never waits for
// a worker that has not started (on two cores a worker is often descheduled for milliseconds while
// XLA's own threads run), only for chunks already claimed, and while it waits it yields its core.
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

  // Runs body(first, last) over [0, items) in chunks of `chunk` and waits for all. A call made
  // while another one runs (XLA may run two custom calls at once) runs alone on its thread.
  template <typename F>
  void Run(int64_t items, int64_t chunk, F&& body) {
    std::unique_lock<std::mutex> busy(running_, std::try_to_lock);
    if (workers_.empty() || items <= chunk || !busy.owns_lock()) return body(0, items);
    std::atomic<int64_t> next{0};
    std::function<void()> job = [&] {
      for (int64_t first; (first = next.fetch_add(chunk)) < items;) body(first, std::min(items, first + chunk));
    };
    uint64_t generation;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      csr_ = _mm_getcsr();
      generation = generation_.load(std::memory_order_relaxed) + 1;
      open_.store(generation, std::memory_order_seq_cst);
      generation_.store(generation, std::memory_order_release);
    }
    wake_.notify_all();
    job();
    open_.store(0, std::memory_order_seq_cst);  // no worker joins this call from here on
    // a worker inside may have lost its core to another thread: after a short spin, lend it ours
    for (int spin = 0; inflight_.load(std::memory_order_seq_cst) > 0; ++spin) {
      if (spin < 256) _mm_pause(); else sched_yield();
    }
  }

 private:
  explicit Pool(unsigned threads) {
    for (unsigned i = 1; i < threads; ++i) workers_.emplace_back([this] { Loop(); });
  }
  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t now = generation_.load(std::memory_order_acquire);
      for (int spin = 0; now == seen && spin < 20000; ++spin) {
        if (spin % 64 == 63) sched_yield(); else _mm_pause();  // spin, but give way to runnable threads
        now = generation_.load(std::memory_order_acquire);
      }
      if (now == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      std::function<void()>* job;
      {  // the generation, its job and the caller's float mode are published together under the lock
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
        // the caller's flush-to-zero and denormals-are-zero (XLA's threads set both): a chunk's
        // result must not depend on which thread runs it
        _mm_setcsr(csr_);
      }
      // Join only while the call is open: the caller closes it, then waits for those inside.
      inflight_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst) == seen) (*job)();
      inflight_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }
  std::vector<std::thread> workers_;
  std::mutex running_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> open_{0};
  std::atomic<int> inflight_{0};
  std::function<void()>* job_ = nullptr;
  unsigned csr_ = 0;
};

// Column blocks [first, last) of m rows, as `group(m0, rows, b, end)` calls: the rows split into
// ceil(m / max_rows) groups of sizes as equal as possible, and every group runs over one span of
// `span` blocks before the next span, so that after the first group the span's weights come from L2.
template <typename Group>
void RowGroupsBySpan(int64_t m, int64_t max_rows, int64_t span, int64_t first, int64_t last, Group&& group) {
  const int64_t groups = (m + max_rows - 1) / max_rows;
  for (int64_t b = first; b < last; b += span) {
    const int64_t end = std::min(last, b + span);
    for (int64_t g = 0, m0 = 0; g < groups; ++g) {
      const int64_t rows = m / groups + (g < m % groups ? 1 : 0);
      group(m0, rows, b, end);
      m0 += rows;
    }
  }
}

// Column blocks per pool chunk: about four chunks a thread, rounded to a multiple of `width` blocks.
inline int64_t ColumnChunk(int64_t blocks, int64_t width) {
  return std::max<int64_t>(width, (blocks / (4 * Pool::Get().size()) + width / 2) / width * width);
}

// The packed products' operands: x [M, K] against a weight packed [N/16, ceil(K/g), 16 g] (g values
// of k a step: 1 for float32, 2 for bfloat16, 4 for int8); for int8 also per-column scales [N] and
// K <= kMaxS8K (the int32 sums are exact while 127 * 127 * K < 2^31).
constexpr int64_t kMaxS8K = 133000;
template <typename X, typename W>
bool PackedShapes(const X& x, const W& w, int64_t group) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  return xd.size() == 2 && wd.size() == 3 && wd[2] == 16 * group && xd[1] <= group * wd[1] &&
         xd[1] > group * (wd[1] - 1);
}

template <typename X, typename W>
bool S8Shapes(const X& x, const W& w, const ffi::Buffer<ffi::F32>& scale) {
  const auto sd = scale.dimensions();
  const int64_t blocks = w.dimensions().size() == 3 ? w.dimensions()[0] : 0;
  return PackedShapes(x, w, 4) && x.dimensions()[1] <= kMaxS8K && sd.size() == 1 && sd[0] <= 16 * blocks &&
         sd[0] > 16 * (blocks - 1);
}

inline ffi::Error F32ShapeError() {
  return ffi::Error::InvalidArgument("hsd f32 matmul: x must be [M, K] and w [N/16, K, 16]");
}
inline ffi::Error Bf16ShapeError() {
  return ffi::Error::InvalidArgument("hsd bf16 matmul: x must be [M, K] and w [N/16, ceil(K/2), 32]");
}
inline ffi::Error S8ShapeError() {
  return ffi::Error::InvalidArgument("hsd int8 matmul: x must be [M, K] (K <= " + std::to_string(kMaxS8K) +
                                     "), w [N/16, K/4, 64] and scales [N]");
}

// A buffer [..., W] as rows of width W >= 1: false for a scalar or an empty last axis.
template <typename Buffer>
bool AsRows(const Buffer& x, int64_t& rows, int64_t& width) {
  const auto dims = x.dimensions();
  if (dims.size() < 1 || dims.back() < 1) return false;
  width = dims.back();
  rows = x.element_count() / width;
  return true;
}

// The first index in [0, n) whose running sum exceeds u, clamped to the last index with mass, or
// n - 1 where none has any (sampling.py's `_first_above`); `sums` holds the running sums of `mass`.
inline int64_t FirstAbove(const double* sums, const double* mass, int64_t n, double u) {
  int64_t index = 0, last_positive = n - 1;
  while (index < n && sums[index] <= u) ++index;
  while (last_positive >= 0 && !(mass[last_positive] > 0.0)) --last_positive;
  return std::min(index, last_positive < 0 ? n - 1 : last_positive);
}

// table [V, D] bf16, ids [N] -> out [N, D] float32: rows read in place (XLA:CPU gathers a bf16
// table by converting all of it to float32 first). Ids outside [0, V) are clamped.
ffi::Error EmbeddingRowsImpl(ffi::Buffer<ffi::BF16> table, ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> out) {
  const auto td = table.dimensions();
  if (td.size() != 2 || ids.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("hsd embedding rows: table must be [V, D] and ids [N]");
  }
  const int64_t vocab = td[0], d = td[1], n = ids.dimensions()[0];
  const auto* tp = reinterpret_cast<const uint16_t*>(table.untyped_data());
  const int32_t* ip = ids.typed_data();
  float* op = out->typed_data();
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* row = tp + std::min<int64_t>(std::max<int64_t>(ip[i], 0), vocab - 1) * d;
    for (int64_t j = 0; j < d; ++j) {
      const uint32_t bits = static_cast<uint32_t>(row[j]) << 16;
      std::memcpy(op + i * d + j, &bits, 4);
    }
  }
  return ffi::Error::Success();
}

// sampling.py's two-stage draw for each row of mass [rows, v] with uniforms [rows, 2] -> out
// [rows]: a block of 256 tokens by the first uniform over the blocks' masses (block_sum(p, count):
// the mass of count entries, each clamped at zero, in float32 lanes), then a token inside it by the
// second, the running sums in float64. A row with no mass gives v - 1.
template <typename BlockSum>
void SampleRows(const float* mass, const float* uniforms, int64_t rows, int64_t v, int32_t* out,
                BlockSum&& block_sum) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (v + kBlock - 1) / kBlock;
  std::vector<double> block_mass(blocks), block_sums(blocks), inside(kBlock), inside_sums(kBlock);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = mass + r * v;
    double running = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      block_mass[b] = block_sum(row + b * kBlock, std::min(v, (b + 1) * kBlock) - b * kBlock);
      running += block_mass[b];
      block_sums[b] = running;
    }
    const float* u = uniforms + 2 * r;
    const int64_t block = FirstAbove(block_sums.data(), block_mass.data(), blocks, u[0] * running);
    const int64_t first = block * kBlock, width = std::min(v, first + kBlock) - first;
    double inner = 0.0;
    for (int64_t j = 0; j < width; ++j) {
      inside[j] = row[first + j] > 0.0f ? row[first + j] : 0.0;
      inner += inside[j];
      inside_sums[j] = inner;
    }
    const int64_t token = first + FirstAbove(inside_sums.data(), inside.data(), width, u[1] * inner);
    out[r] = static_cast<int32_t>(std::min(token, v - 1));
  }
}

// The attention kernel's shapes: q [B, T, H, D], cache [L, B, S, H_kv, D], mask [B, T, S].
struct AttentionShape {
  int64_t batch, steps, heads, d, size, kv_heads, groups, kv_stride, layer;
  float scale;
};

inline bool ReadAttentionShape(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                               const ffi::Buffer<ffi::PRED>& mask, int64_t layer, AttentionShape& s) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || md.size() != 3 || kd[1] != qd[0] || kd[4] != qd[3] ||
      qd[2] % kd[3] != 0 || md[0] != qd[0] || md[1] != qd[1] || md[2] != kd[2] || layer < 0 || layer >= kd[0] ||
      qd[3] > 256) {
    return false;
  }
  s = {qd[0], qd[1], qd[2], qd[3], kd[2], kd[3], qd[2] / kd[3], kd[3] * qd[3], layer,
       1.f / std::sqrt(static_cast<float>(qd[3]))};
  return true;
}

inline ffi::Error AttentionShapeError() {
  return ffi::Error::InvalidArgument("hsd attention: q [B, T, H, D], cache [L, B, S, H_kv, D], mask [B, T, S]");
}

// One query row's heads of one KV group: where its q, the group's keys and values, the row's mask
// and its output lie.
struct AttentionTask {
  const float* q;
  const float* k;
  const float* v;
  const bool* mask;
  float* out;
};

// attend(task, scores) for every (batch row, step, KV group), over the pool; `scores` is a scratch
// of groups * size floats for the calling thread.
template <typename Attend>
void ForEachAttentionTask(const AttentionShape& s, const float* q, const float* k, const float* v, const bool* mask,
                          float* out, Attend&& attend) {
  const float* kp = k + s.layer * s.batch * s.size * s.kv_stride;
  const float* vp = v + s.layer * s.batch * s.size * s.kv_stride;
  Pool::Get().Run(s.batch * s.steps * s.kv_heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scores(s.groups * s.size);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / (s.steps * s.kv_heads), row = task / s.kv_heads, h = task % s.kv_heads;
      const int64_t head = row * s.heads + h * s.groups;
      attend(AttentionTask{q + head * s.d, kp + b * s.size * s.kv_stride + h * s.d,
                           vp + b * s.size * s.kv_stride + h * s.d, mask + row * s.size, out + head * s.d},
             scores.data());
    }
  });
}

}  // namespace
