// SwiGLU of the fused gate/up projection as an XLA FFI handler for XLA:CPU.
//
// y [M, F, 2] f32 (gate, up interleaved: `mintjax.model.fused` layout),
// optional LoRA deltas d_gate, d_up [M, F] bf16 -> out [M, F] bf16:
//   gate = bf16(y[..., 0] + d_gate), up = bf16(y[..., 1] + d_up)
//   out  = bf16(silu(gate) * up)            (silu in f32)
// as `fused.gate_up` computes it, except that XLA also rounds silu(gate)
// to bf16 before the product (here one rounding: within a bf16 ulp). Why:
// XLA:CPU ran this elementwise at ~2 ns an element on this host (58 ms of
// a 230 ms SmolLM2 prefill of 16 x 32 tokens, 1.4 ms of a decode step);
// AVX-512 with a polynomial exp does it at a fraction of that.
#include <immintrin.h>

#include <cstdint>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mintjax::Exp16;

inline __m512 RoundBf16(__m512 x) {  // f32 -> bf16 (nearest even) -> f32
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 LoadBf16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

void Rows(const float* y, const uint16_t* dg, const uint16_t* du,
          uint16_t* out, int64_t f, int64_t r0, int64_t r1) {
  alignas(64) static const int32_t kEven[16] = {0, 2, 4, 6, 8, 10, 12, 14,
                                                16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int32_t kOdd[16] = {1, 3, 5, 7, 9, 11, 13, 15,
                                               17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i even = _mm512_load_si512(kEven);
  const __m512i odd = _mm512_load_si512(kOdd);
  for (int64_t r = r0; r < r1; ++r) {
    const float* yr = y + r * f * 2;
    for (int64_t i = 0; i < f; i += 16) {
      const int64_t left = f - i;
      const __mmask16 m = left >= 16 ? 0xffff : (1u << left) - 1u;
      const __mmask16 lo = left >= 8 ? 0xffff : (1u << (2 * left)) - 1u;
      const __mmask16 hi = left >= 16 ? 0xffff
                           : left > 8 ? (1u << (2 * (left - 8))) - 1u : 0;
      const __m512 a = _mm512_maskz_loadu_ps(lo, yr + 2 * i);
      const __m512 b = _mm512_maskz_loadu_ps(hi, yr + 2 * i + 16);
      __m512 gate = _mm512_permutex2var_ps(a, even, b);
      __m512 up = _mm512_permutex2var_ps(a, odd, b);
      if (dg != nullptr) {
        gate = _mm512_add_ps(gate, LoadBf16(dg + r * f + i, m));
        up = _mm512_add_ps(up, LoadBf16(du + r * f + i, m));
      }
      gate = RoundBf16(gate);
      up = RoundBf16(up);
      const __m512 denom = _mm512_add_ps(
          _mm512_set1_ps(1.f), Exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate)));
      const __m512 o = _mm512_mul_ps(_mm512_div_ps(gate, denom), up);
      _mm256_mask_storeu_epi16(out + r * f + i, m,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(o)));
    }
  }
}

ffi::Error Check(const ffi::AnyBuffer& y, const ffi::AnyBuffer* dg,
                 const ffi::AnyBuffer* du, ffi::Result<ffi::AnyBuffer>& out) {
  auto yd = y.dimensions();
  auto od = out->dimensions();
  if (y.element_type() != ffi::DataType::F32 ||
      out->element_type() != ffi::DataType::BF16 || yd.size() != 3 ||
      yd[2] != 2 || od.size() != 2 || od[0] != yd[0] || od[1] != yd[1])
    return ffi::Error::InvalidArgument(
        "mintjax_swiglu: y must be f32 [M, F, 2] and out bf16 [M, F]");
  for (const ffi::AnyBuffer* d : {dg, du}) {
    if (d == nullptr) continue;
    auto dd = d->dimensions();
    if (d->element_type() != ffi::DataType::BF16 || dd.size() != 2 ||
        dd[0] != yd[0] || dd[1] != yd[1])
      return ffi::Error::InvalidArgument(
          "mintjax_swiglu: deltas must be bf16 [M, F]");
  }
  return ffi::Error::Success();
}

ffi::Error Run(ffi::ThreadPool& pool, const ffi::AnyBuffer& y,
               const uint16_t* dg, const uint16_t* du,
               ffi::Result<ffi::AnyBuffer>& out) {
  const int64_t m = y.dimensions()[0], f = y.dimensions()[1];
  const auto* yp = static_cast<const float*>(y.untyped_data());
  auto* op = static_cast<uint16_t*>(out->untyped_data());
  // Rows are independent; small calls stay on the caller's thread.
  if (m * f < (1 << 16)) {
    Rows(yp, dg, du, op, f, 0, m);
  } else {
    mintjax::ParallelFor(pool, m, [=](int64_t r0, int64_t r1) {
      Rows(yp, dg, du, op, f, r0, r1);
    });
  }
  return ffi::Error::Success();
}

ffi::Error SwiGlu(ffi::ThreadPool pool, ffi::AnyBuffer y,
                  ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = Check(y, nullptr, nullptr, out); !e.success()) return e;
  return Run(pool, y, nullptr, nullptr, out);
}

ffi::Error SwiGluDeltas(ffi::ThreadPool pool, ffi::AnyBuffer y,
                        ffi::AnyBuffer dg, ffi::AnyBuffer du,
                        ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = Check(y, &dg, &du, out); !e.success()) return e;
  return Run(pool, y, static_cast<const uint16_t*>(dg.untyped_data()),
             static_cast<const uint16_t*>(du.untyped_data()), out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MintjaxSwiGlu, SwiGlu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MintjaxSwiGluDeltas, SwiGluDeltas,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
