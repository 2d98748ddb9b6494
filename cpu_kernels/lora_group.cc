// The slot-dense LoRA deltas of one target group (targets reading one
// input, e.g. q/k/v) in one XLA FFI call for XLA:CPU.
//
// x [M, Kx] bf16 (Kx a multiple of 32, zero-padded), shrink: the group's
// [n * A * R, d_in] factors packed (amx_gemm.h), expand: the n targets'
// [d_out_i, A * R] factors packed one after another (each padded to a
// multiple of 64 rows), adapter_idx [M] int32 (slot; 1..A adapt, anything
// else is a base row), scale [A] f32 -> deltas [M, sum d_out_i] bf16:
//   h    = x @ shrink^T                                    (f32)
//   h_i  = bf16(h[:, i*A*R + c] * scale[a]) where c is in the row's slot a
//          (c / R == idx - 1), else 0
//   out_i = bf16(h_i @ expand_i^T)
// exactly `SlotDenseLayer.deltas` (mintjax/adapters/slot_dense.py) with
// the same roundings. Why one call: per layer the XLA formulation was a
// shrink GEMM, a mask, scale and cast per target and an expand GEMM per
// target (11 custom calls and ~20 small fusions per SmolLM2 layer), and
// their dispatch and thread wake-ups, not their bytes, set the LoRA cost.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "amx_gemm.h"
#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mintjax::F32ToBf16;


ffi::Error LoraGroup(ffi::ThreadPool pool, ffi::AnyBuffer x,
                     ffi::AnyBuffer shrink, ffi::AnyBuffer expand,
                     ffi::AnyBuffer adapter_idx, ffi::AnyBuffer scale,
                     ffi::Result<ffi::AnyBuffer> out, int64_t rank,
                     int64_t d_out0, int64_t d_out1, int64_t d_out2) {
  using ffi::DataType;
  const char* kShapes =
      "mintjax_lora_group: x bf16 [M, Kx], shrink/expand packed bf16 "
      "[NB, KC, 4, 16, 32], adapter_idx int32 [M], scale f32 [A], out bf16 "
      "[M, sum d_out]; shapes disagree";
  if (x.element_type() != DataType::BF16 ||
      shrink.element_type() != DataType::BF16 ||
      expand.element_type() != DataType::BF16 ||
      adapter_idx.element_type() != DataType::S32 ||
      scale.element_type() != DataType::F32 ||
      out->element_type() != DataType::BF16)
    return ffi::Error::InvalidArgument(kShapes);
  auto xd = x.dimensions(), sd = shrink.dimensions(), ed = expand.dimensions();
  auto id = adapter_idx.dimensions(), cd = scale.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || sd.size() != 5 || ed.size() != 5 || id.size() != 1 ||
      cd.size() != 1 || od.size() != 2)
    return ffi::Error::InvalidArgument(kShapes);
  const int64_t m = xd[0], kx = xd[1], adapters = cd[0];
  const int64_t d_outs[3] = {d_out0, d_out1, d_out2};
  int64_t n = 0, total_out = 0, total_blocks = 0;
  int64_t block0[3], out0[3];
  for (int64_t i = 0; i < 3 && d_outs[i] > 0; ++i, ++n) {
    block0[i] = total_blocks;
    out0[i] = total_out;
    total_blocks += (d_outs[i] + 63) / 64;
    total_out += d_outs[i];
  }
  const int64_t width = adapters * rank;  // A * R columns per target
  const int64_t h_cols = n * width;
  const int64_t ke = ed[1] * 32;          // expand K, padded
  if (n == 0 || rank <= 0 || id[0] != m || od[0] != m ||
      od[1] != total_out || kx != sd[1] * 32 || sd[0] * 64 < h_cols ||
      (sd[0] - 1) * 64 >= h_cols || ed[0] != total_blocks || ke < width ||
      ke - width >= 32)
    return ffi::Error::InvalidArgument(kShapes);
  if (m == 0) return ffi::Error::Success();

  const auto* idx = static_cast<const int32_t*>(adapter_idx.untyped_data());
  const auto* sc = static_cast<const float*>(scale.untyped_data());
  // Which work a 16-row block needs: a prompt's rows share one slot, so at
  // prefill most shrink columns and expand K-chunks belong to no row of the
  // block (decode rows usually span every slot: nothing is skipped).
  const int64_t mblocks = (m + 15) / 16;
  const int64_t shrink_blocks = sd[0], kc_e = ke / 32;
  std::vector<uint8_t> shrink_live(mblocks * shrink_blocks, 0);
  std::vector<uint8_t> expand_live(mblocks * kc_e, 0);
  std::vector<int64_t> slot(m, -1);  // the row's adapter 0..A-1, -1: none
  for (int64_t r = 0; r < m; ++r) {
    const int64_t a = static_cast<int64_t>(idx[r]) - 1;
    if (a < 0 || a >= adapters) continue;
    slot[r] = a;
    const int64_t mb = r / 16;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c0 = i * width + a * rank, c1 = c0 + rank - 1;
      for (int64_t nb = c0 / 64; nb <= c1 / 64; ++nb)
        shrink_live[mb * shrink_blocks + nb] = 1;
    }
    for (int64_t kc = (a * rank) / 32; kc <= ((a + 1) * rank - 1) / 32; ++kc)
      expand_live[mb * kc_e + kc] = 1;
  }
  // Scratch the GEMMs overwrite entirely: left uninitialised (a prefill's
  // would be megabytes of memset per call).
  std::unique_ptr<float[]> h(new float[m * h_cols]);
  const mintjax::GemmProblem shrink_p{
      static_cast<const uint16_t*>(x.untyped_data()),
      static_cast<const uint16_t*>(shrink.untyped_data()), h.get(), m, kx,
      h_cols, sd[0], kx, h_cols, shrink_live.data(), nullptr};
  mintjax::ParallelFor(pool, shrink_p.num_blocks, [&](int64_t b0, int64_t b1) {
    mintjax::GemmBlocks(shrink_p, b0, b1);
  });

  // Each row keeps only its slot's R columns of every target's h.
  std::vector<uint16_t> hb(n * m * ke, 0);
  for (int64_t r = 0; r < m; ++r) {
    const int64_t a = slot[r];
    if (a < 0) continue;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = a * rank; c < (a + 1) * rank; ++c)
        hb[(i * m + r) * ke + c] = F32ToBf16(h[r * h_cols + i * width + c] * sc[a]);
  }

  auto* o = static_cast<uint16_t*>(out->untyped_data());
  const auto* ew = static_cast<const uint16_t*>(expand.untyped_data());
  mintjax::ParallelFor(pool, total_blocks, [&](int64_t b0, int64_t b1) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t nb = (d_outs[i] + 63) / 64;
      const int64_t lo = std::max(b0, block0[i]);
      const int64_t hi = std::min(b1, block0[i] + nb);
      if (lo >= hi) continue;
      mintjax::GemmProblem p{
          hb.data() + i * m * ke, ew + block0[i] * (ke / 32) * 2048,
          nullptr, m, ke, d_outs[i], nb, ke, total_out,
          nullptr, expand_live.data(), o + out0[i]};
      mintjax::GemmBlocks(p, lo - block0[i], hi - block0[i]);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MintjaxLoraGroup, LoraGroup,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("rank")
                                  .Attr<int64_t>("d_out0")
                                  .Attr<int64_t>("d_out1")
                                  .Attr<int64_t>("d_out2"));
