// The AMX GEMM loop shared by the native ops: y[M, N] (f32) = x[M, K] (bf16)
// @ W^T for a weight pre-packed by cpu_kernels/amx.py `pack`:
// [NB, KC, 4, 16, 32] bf16 where
//   packed[nb][kc][t][r][2 * j + p] = W[nb * 64 + t * 16 + j, kc * 32 + 2 * r + p]
// so each 1 KiB AMX B tile is one contiguous read and the weight streams
// once, front to back. The caller has AMX tile state (mintjax_amx_init).
#ifndef MINTJAX_CPU_KERNELS_AMX_GEMM_H_
#define MINTJAX_CPU_KERNELS_AMX_GEMM_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace mintjax {

struct GemmProblem {
  const uint16_t* x;  // [M, K] bf16, rows x_stride elements apart
  const uint16_t* w;  // packed [NB, K / 32, 4, 16, 32]
  float* y;           // [M, N] f32, rows y_stride elements apart
  int64_t m, k, n, num_blocks, x_stride, y_stride;
  // Optional sparsity, per 16-row block mb of x (nullptr: everything live):
  // block_live[mb * num_blocks + nb] == 0 leaves that 16 x 64 tile of y
  // unwritten; chunk_live[mb * (K / 32) + kc] == 0 promises x's 32-column
  // chunk kc is all zeros in those rows, so it is skipped (exact).
  const uint8_t* block_live = nullptr;
  const uint8_t* chunk_live = nullptr;
  // Optional: write y as bf16 (nearest even) here instead of f32 to `y`.
  uint16_t* y_bf16 = nullptr;
};

struct GemmTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C (m x 16 f32), 4: A (m x 32 bf16), 5-7: B (16 pair-rows).
inline void ConfigureGemm(int m) {
  GemmTileConfig c;
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

// Columns [64 nb0, 64 nb1) of y, every row; N need not be a multiple of 64.
inline void GemmBlocks(const GemmProblem& p, int64_t nb0, int64_t nb1) {
  const int64_t kc_count = p.k / 32;
  alignas(64) float partial[16 * 64];
  int configured = -1;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint16_t* wb = p.w + nb * kc_count * 2048;
    const int64_t cols = std::min<int64_t>(64, p.n - nb * 64);
    for (int64_t m0 = 0; m0 < p.m; m0 += 16) {
      const int64_t mb = m0 / 16;
      if (p.block_live != nullptr && !p.block_live[mb * p.num_blocks + nb])
        continue;
      const uint8_t* live = p.chunk_live == nullptr ? nullptr
                                                    : p.chunk_live + mb * kc_count;
      const int rows = static_cast<int>(std::min<int64_t>(16, p.m - m0));
      if (rows != configured) {
        ConfigureGemm(rows);
        configured = rows;
      }
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* xa = p.x + m0 * p.x_stride;
      const uint16_t* b = wb;
      for (int64_t kc = 0; kc < kc_count; ++kc, b += 2048) {
        if (live != nullptr && !live[kc]) continue;
        _tile_loadd(4, xa + kc * 32, p.x_stride * 2);
        _tile_loadd(5, b, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, b + 512, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, b + 1024, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, b + 1536, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
      if (p.y_bf16 != nullptr) {
        _tile_stored(0, partial, 256);
        _tile_stored(1, partial + 16, 256);
        _tile_stored(2, partial + 32, 256);
        _tile_stored(3, partial + 48, 256);
        const __mmask16 full = 0xffff;
        for (int r = 0; r < rows; ++r) {
          uint16_t* dst = p.y_bf16 + (m0 + r) * p.y_stride + nb * 64;
          for (int64_t c = 0; c < cols; c += 16) {
            const int64_t left = cols - c;
            const __mmask16 mask =
                left >= 16 ? full : static_cast<__mmask16>((1u << left) - 1u);
            const __m256bh v = _mm512_cvtneps_pbh(_mm512_load_ps(partial + r * 64 + c));
            _mm256_mask_storeu_epi16(dst + c, mask, reinterpret_cast<__m256i>(v));
          }
        }
        continue;
      }
      float* out = p.y + m0 * p.y_stride + nb * 64;
      if (cols == 64) {
        const int64_t stride = p.y_stride * 4;
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
          std::memcpy(out + r * p.y_stride, partial + r * 64,
                      cols * sizeof(float));
      }
    }
  }
  _tile_release();
}

}  // namespace mintjax

#endif  // MINTJAX_CPU_KERNELS_AMX_GEMM_H_
