// One-query (decode) grouped-query attention over a bf16 KV cache, as an
// XLA FFI handler for XLA:CPU.
//
// q [B, H, hd], k [B, S, K, hd], v [B, S, K, hv] (bf16), q_pos [B] and
// k_pos [B, S] (int32) -> out [B, H * hv] (bf16). Key s of row b is visible
// when 0 <= k_pos[b, s] <= q_pos[b]. Same math as
// mintjax.model.layers._one_query_attention: f32 scores times `scale`,
// masked scores at -1e30, softmax over S in f32, probabilities rounded to
// bf16, f32 sums, output rounded to bf16. Why: XLA:CPU ran that
// multiply-reduce at ~0.3 ms per layer and step for a 64-position cache of
// SmolLM2 at B = 16 (9 ms of a 31 ms decode step). Here both products run
// on AMX tiles per (row, kv head): the scores read k straight from the
// cache (a tile load takes the cache's row stride), the values are
// re-laid in pairs once; softmax in AVX-512.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mintjax::Exp16;
using mintjax::F32ToBf16;
using mintjax::TailMask;

constexpr float kNegInf = -1e30f;

struct Dims {
  int64_t b, h, hd, s, k, hv, g;
};

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Scores: tile 0 = C [keys x G] f32, 1 = A (keys x 32 bf16 of k),
// 2 = B (16 pairs of hd x G, q^T in pairs).
void ConfigureScores(int keys, int g) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette_id = 1;
  c.rows[0] = keys; c.colsb[0] = g * 4;
  c.rows[1] = keys; c.colsb[1] = 64;
  c.rows[2] = 16;   c.colsb[2] = g * 4;
  _tile_loadconfig(&c);
}

// Probabilities x values: tiles 0-3 = C [G x 16] f32, 4 = A (G x 32 keys
// of bf16 probabilities), 5-6 = B (16 key pairs x 16 values, in pairs).
void ConfigureValues(int g) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette_id = 1;
  for (int t = 0; t < 4; ++t) { c.rows[t] = g; c.colsb[t] = 64; }
  c.rows[4] = g; c.colsb[4] = 64;
  c.rows[5] = 16; c.colsb[5] = 64;
  c.rows[6] = 16; c.colsb[6] = 64;
  _tile_loadconfig(&c);
}

struct Scratch {
  std::vector<uint16_t> q_pairs;   // [hd / 32][16][G * 2]
  std::vector<float> scores_sg;    // [S][G]
  std::vector<float> scores_gs;    // [G][S_pad]
  std::vector<uint16_t> probs;     // [G][S_pad] bf16
  std::vector<uint16_t> v_pairs;   // [S_pad / 2][hv * 2]
  alignas(64) float out[16 * 64];
};

void AttendRowHead(const Dims& d, const uint16_t* q, const uint16_t* k,
                   const uint16_t* v, const int32_t* q_pos,
                   const int32_t* k_pos, uint16_t* out, float scale,
                   int64_t b, int64_t kh, Scratch& w) {
  const int64_t G = d.g, S = d.s, hd = d.hd, hv = d.hv;
  const int64_t s_pad = (S + 31) / 32 * 32;
  const int64_t chunks = hd / 32;
  // q^T in AMX pairs: q_pairs[c][r][2 g + p] = q[g][32 c + 2 r + p].
  w.q_pairs.resize(chunks * 16 * G * 2);
  for (int64_t g = 0; g < G; ++g) {
    const uint16_t* qr = q + (b * d.h + kh * G + g) * hd;
    for (int64_t i = 0; i < hd; ++i) {
      const int64_t c = i / 32, r = (i % 32) / 2, pp = i % 2;
      w.q_pairs[(c * 16 + r) * G * 2 + g * 2 + pp] = qr[i];
    }
  }
  // Scores [S][G] = k rows (strided in the cache) x q^T, 16 keys a tile.
  w.scores_sg.resize(s_pad * G);
  const int64_t k_stride = d.k * hd * 2;
  int configured = -1;
  for (int64_t s0 = 0; s0 < S; s0 += 16) {
    const int keys = static_cast<int>(std::min<int64_t>(16, S - s0));
    if (keys != configured) { ConfigureScores(keys, G); configured = keys; }
    _tile_zero(0);
    const uint16_t* kr = k + ((b * S + s0) * d.k + kh) * hd;
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(1, kr + c * 32, k_stride);
      _tile_loadd(2, w.q_pairs.data() + c * 16 * G * 2, G * 4);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, w.scores_sg.data() + s0 * G, G * 4);
  }
  // Mask, scale and softmax per query head over S (padded keys get 0).
  w.scores_gs.assign(G * s_pad, kNegInf);
  const int32_t qp = q_pos[b];
  for (int64_t s = 0; s < S; ++s) {
    const int32_t kp = k_pos[b * S + s];
    if (kp < 0 || kp > qp) continue;
    for (int64_t g = 0; g < G; ++g)
      w.scores_gs[g * s_pad + s] = w.scores_sg[s * G + g] * scale;
  }
  w.probs.assign(G * s_pad, 0);
  for (int64_t g = 0; g < G; ++g) {
    float* sc = &w.scores_gs[g * s_pad];
    __m512 mx = _mm512_set1_ps(kNegInf);
    for (int64_t s = 0; s < s_pad; s += 16)
      mx = _mm512_max_ps(mx, _mm512_loadu_ps(sc + s));
    // Padding keys beyond S stay masked out of the maximum too.
    const float m = _mm512_reduce_max_ps(mx);
    const bool any_visible = m > kNegInf;
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < s_pad; s += 16) {
      const __m512 x = _mm512_loadu_ps(sc + s);
      __m512 e = Exp16(_mm512_sub_ps(x, _mm512_set1_ps(m)));
      // Masked keys add exactly 0 under a visible maximum; with none
      // visible every real key weighs the same (as the XLA softmax).
      const __mmask16 masked = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kNegInf),
                                                  _CMP_EQ_OQ);
      if (any_visible) e = _mm512_maskz_mov_ps(~masked, e);
      const __mmask16 real = TailMask(S - s);
      e = _mm512_maskz_mov_ps(real, e);
      _mm512_storeu_ps(sc + s, e);
      total = _mm512_add_ps(total, e);
    }
    const float sum = _mm512_reduce_add_ps(total);
    for (int64_t s = 0; s < S; ++s) w.probs[g * s_pad + s] = F32ToBf16(sc[s] / sum);
  }
  // Values in AMX pairs: v_pairs[j][2 i + p] = v[2 j + p][i] (0 past S).
  w.v_pairs.resize(s_pad / 2 * hv * 2);
  // [a0..a15 | b0..b15] -> a0 b0 a1 b1 ... a15 b15.
  alignas(64) static const uint16_t kInterleave[32] = {
      0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  const int64_t v_stride = d.k * hv;
  for (int64_t j = 0; j < s_pad / 2; ++j) {
    const int64_t s = 2 * j;
    const uint16_t* va = v + ((b * S + s) * d.k + kh) * hv;
    uint16_t* dst = &w.v_pairs[j * hv * 2];
    for (int64_t i = 0; i < hv; i += 16) {
      const __m256i a = s < S ? _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(va + i)) : _mm256_setzero_si256();
      const __m256i bb = s + 1 < S ? _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(va + v_stride + i))
          : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), bb, 1);
      _mm512_storeu_si512(dst + 2 * i, _mm512_permutexvar_epi16(interleave, both));
    }
  }
  // out [G][hv] = probs [G][S] x v [S][hv], 64 values at a time.
  ConfigureValues(G);
  for (int64_t i0 = 0; i0 < hv; i0 += 64) {
    const int64_t tiles = std::min<int64_t>(4, (hv - i0) / 16);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s0 = 0; s0 < s_pad; s0 += 32) {
      _tile_loadd(4, w.probs.data() + s0, s_pad * 2);
      const uint16_t* vb = w.v_pairs.data() + (s0 / 2) * hv * 2 + i0 * 2;
      // Tile ids are immediates: unrolled by hand.
      _tile_loadd(5, vb, hv * 4);
      _tile_dpbf16ps(0, 4, 5);
      if (tiles > 1) { _tile_loadd(6, vb + 32, hv * 4); _tile_dpbf16ps(1, 4, 6); }
      if (tiles > 2) { _tile_loadd(5, vb + 64, hv * 4); _tile_dpbf16ps(2, 4, 5); }
      if (tiles > 3) { _tile_loadd(6, vb + 96, hv * 4); _tile_dpbf16ps(3, 4, 6); }
    }
    _tile_stored(0, w.out, 256);
    if (tiles > 1) _tile_stored(1, w.out + 16, 256);
    if (tiles > 2) _tile_stored(2, w.out + 32, 256);
    if (tiles > 3) _tile_stored(3, w.out + 48, 256);
    for (int64_t g = 0; g < G; ++g) {
      uint16_t* o = out + b * d.h * hv + (kh * G + g) * hv + i0;
      for (int64_t i = 0; i < tiles * 16; ++i) o[i] = F32ToBf16(w.out[g * 64 + i]);
    }
  }
  _tile_release();
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::AnyBuffer q,
                           ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::AnyBuffer q_pos, ffi::AnyBuffer k_pos,
                           ffi::Result<ffi::AnyBuffer> out, float scale) {
  using ffi::DataType;
  if (q.element_type() != DataType::BF16 || k.element_type() != DataType::BF16 ||
      v.element_type() != DataType::BF16 ||
      out->element_type() != DataType::BF16 ||
      q_pos.element_type() != DataType::S32 ||
      k_pos.element_type() != DataType::S32)
    return ffi::Error::InvalidArgument(
        "mintjax_decode_attention: expects bf16 q/k/v/out, int32 positions");
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto pd = q_pos.dimensions(), kpd = k_pos.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || pd.size() != 1 ||
      kpd.size() != 2)
    return ffi::Error::InvalidArgument(
        "mintjax_decode_attention: q [B, H, hd], k/v [B, S, K, d], q_pos [B], "
        "k_pos [B, S]");
  Dims d{qd[0], qd[1], qd[2], kd[1], kd[2], vd[3], 0};
  if (kd[0] != d.b || kd[3] != d.hd || vd[0] != d.b || vd[1] != d.s ||
      vd[2] != d.k || pd[0] != d.b || kpd[0] != d.b || kpd[1] != d.s ||
      d.k == 0 || d.h % d.k != 0)
    return ffi::Error::InvalidArgument(
        "mintjax_decode_attention: shapes of q, k, v and positions disagree");
  d.g = d.h / d.k;
  if (d.g > 16 || d.hd % 32 != 0 || d.hv % 16 != 0)
    return ffi::Error::InvalidArgument(
        "mintjax_decode_attention: needs H / K <= 16, hd % 32 == 0 and "
        "hv % 16 == 0 (cpu_kernels.attention.supports)");
  const auto* qp = static_cast<const uint16_t*>(q.untyped_data());
  const auto* kp = static_cast<const uint16_t*>(k.untyped_data());
  const auto* vp = static_cast<const uint16_t*>(v.untyped_data());
  const auto* qpos = static_cast<const int32_t*>(q_pos.untyped_data());
  const auto* kpos = static_cast<const int32_t*>(k_pos.untyped_data());
  auto* op = static_cast<uint16_t*>(out->untyped_data());
  mintjax::ParallelFor(pool, d.b * d.k, [=](int64_t i0, int64_t i1) {
    thread_local Scratch scratch;
    for (int64_t i = i0; i < i1; ++i)
      AttendRowHead(d, qp, kp, vp, qpos, kpos, op, scale, i / d.k, i % d.k,
                    scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MintjaxDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));
