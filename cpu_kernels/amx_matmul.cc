// bf16 x bf16 -> f32 matmul on Intel AMX for XLA:CPU, as an XLA FFI handler.
//
// y[M, N] = x[M, K] @ W^T, W pre-packed (the loop and the layout:
// amx_gemm.h). Why: XLA:CPU's M = 16 decode GEMMs stream
// weights at ~7 GB/s inside a model on this 2-core AMX host; this loop reads
// them at ~23 GB/s (docs/BENCHMARKS.md, issue 18).
//
// Work is split over 64-column blocks (parallel.h).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "amx_gemm.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

ffi::Error AmxMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x,
                     ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  if (x.element_type() != ffi::DataType::BF16 ||
      w.element_type() != ffi::DataType::BF16 ||
      y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument(
        "mintjax_amx_matmul: expects bf16 x, bf16 packed w, f32 y");
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 5 || yd.size() != 2 || wd[2] != 4 ||
      wd[3] != 16 || wd[4] != 32)
    return ffi::Error::InvalidArgument(
        "mintjax_amx_matmul: x must be [M, K], w [NB, KC, 4, 16, 32], y [M, N]");
  mintjax::GemmProblem p{static_cast<const uint16_t*>(x.untyped_data()),
                         static_cast<const uint16_t*>(w.untyped_data()),
                         static_cast<float*>(y->untyped_data()),
                         xd[0], xd[1], yd[1], wd[0], xd[1], yd[1],
                         nullptr, nullptr};
  if (yd[0] != p.m || p.k != wd[1] * 32 || p.n > p.num_blocks * 64 ||
      p.n <= (p.num_blocks - 1) * 64)
    return ffi::Error::InvalidArgument(
        "mintjax_amx_matmul: shapes of x, packed w and y do not agree");
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();

  mintjax::ParallelFor(pool, p.num_blocks, [p](int64_t nb0, int64_t nb1) {
    mintjax::GemmBlocks(p, nb0, nb1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MintjaxAmxMatmul, AmxMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// 0 when this process may use AMX tiles (Linux grants XTILEDATA per
// process); the Python side calls it before registering the handler.
extern "C" int mintjax_amx_init() {
  return static_cast<int>(
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata));
}
