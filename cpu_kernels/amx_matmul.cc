// bf16 x bf16 -> f32 matmul on Intel AMX for XLA:CPU, as an XLA FFI handler.
//
// y[M, N] = x[M, K] @ W^T, W given pre-packed ("amx layout", see
// cpu_kernels/amx.py `pack`): [NB, KC, 4, 16, 32] bf16 where
//   packed[nb][kc][t][r][2 * j + p] = W[nb * 64 + t * 16 + j, kc * 32 + 2 * r + p]
// so each 1 KiB AMX B tile is one contiguous read and the whole weight
// streams once, front to back. Why: XLA:CPU's M = 16 decode GEMMs stream
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

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C (m x 16 f32), 4: A (m x 32 bf16), 5-7: B (16 pair-rows).
void Configure(int m) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette_id = 1;
  for (int t = 0; t < 5; ++t) {
    c.rows[t] = static_cast<uint8_t>(m);
    c.colsb[t] = 64;
  }
  for (int t = 5; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

struct Problem {
  const uint16_t* x;
  const uint16_t* w;
  float* y;
  int64_t m, k, n, num_blocks;
};

void RunBlocks(const Problem& p, int64_t nb0, int64_t nb1) {
  const int64_t kc_count = p.k / 32;
  alignas(64) float partial[16 * 64];
  int configured = -1;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint16_t* wb = p.w + nb * kc_count * 2048;
    const int64_t cols = std::min<int64_t>(64, p.n - nb * 64);
    for (int64_t m0 = 0; m0 < p.m; m0 += 16) {
      const int rows = static_cast<int>(std::min<int64_t>(16, p.m - m0));
      if (rows != configured) {
        Configure(rows);
        configured = rows;
      }
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* xa = p.x + m0 * p.k;
      const uint16_t* b = wb;
      for (int64_t kc = 0; kc < kc_count; ++kc, b += 2048) {
        _tile_loadd(4, xa + kc * 32, p.k * 2);
        _tile_loadd(5, b, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, b + 512, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, b + 1024, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, b + 1536, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
      float* out = p.y + m0 * p.n + nb * 64;
      if (cols == 64) {
        const int64_t stride = p.n * 4;
        _tile_stored(0, out, stride);
        _tile_stored(1, out + 16, stride);
        _tile_stored(2, out + 32, stride);
        _tile_stored(3, out + 48, stride);
      } else {
        _tile_stored(0, partial, 256);
        _tile_stored(1, partial + 16, 256);
        _tile_stored(2, partial + 32, 256);
        _tile_stored(3, partial + 48, 256);
        for (int r = 0; r < rows; ++r)
          std::memcpy(out + r * p.n, partial + r * 64, cols * sizeof(float));
      }
    }
  }
  _tile_release();
}

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
  Problem p{static_cast<const uint16_t*>(x.untyped_data()),
            static_cast<const uint16_t*>(w.untyped_data()),
            static_cast<float*>(y->untyped_data()),
            xd[0], xd[1], yd[1], wd[0]};
  if (yd[0] != p.m || p.k != wd[1] * 32 || p.n > p.num_blocks * 64 ||
      p.n <= (p.num_blocks - 1) * 64)
    return ffi::Error::InvalidArgument(
        "mintjax_amx_matmul: shapes of x, packed w and y do not agree");
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();

  mintjax::ParallelFor(pool, p.num_blocks, [p](int64_t nb0, int64_t nb1) {
    RunBlocks(p, nb0, nb1);
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
