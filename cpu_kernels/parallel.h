// Splitting one FFI call's work over the caller and XLA's intra-op pool.
//
// The caller and up to (threads - 1) pool tasks claim chunks from a shared
// counter; the caller returns once every chunk is done. A pool busy with
// other work never stalls the call: the caller then runs every chunk
// itself, and a task that starts late finds nothing left to claim.
#ifndef MINTJAX_CPU_KERNELS_PARALLEL_H_
#define MINTJAX_CPU_KERNELS_PARALLEL_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace mintjax {

// Runs fn(begin, end) over [0, n) in chunks of about n / (4 * threads).
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n,
                        std::function<void(int64_t, int64_t)> fn) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads == 1 || n == 1) {
    fn(0, n);
    return;
  }
  struct Shared {
    std::function<void(int64_t, int64_t)> fn;
    int64_t n, chunk, num_chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
    void Work() {
      for (;;) {
        const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
        if (c >= num_chunks) return;
        fn(c * chunk, std::min(n, (c + 1) * chunk));
        finished.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->fn = std::move(fn);
  shared->n = n;
  const int64_t target = threads * 4;
  shared->chunk = std::max<int64_t>(1, (n + target - 1) / target);
  shared->num_chunks = (n + shared->chunk - 1) / shared->chunk;
  for (int64_t t = 1; t < std::min(threads, shared->num_chunks); ++t)
    pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  while (shared->finished.load(std::memory_order_acquire) < shared->num_chunks)
    _mm_pause();
}

}  // namespace mintjax

#endif  // MINTJAX_CPU_KERNELS_PARALLEL_H_
