"""bf16 matmuls on Intel AMX for XLA:CPU: the pre-packed weight layout and
the ops that read it.

Owns `PackedKernel` (a [d_out, d_in] weight pre-packed into AMX tiles),
`pack` / `pack_concat` / `unpack`, `matmul` (x [..., d_in] @ W^T ->
[..., d_out] f32; FFI target `mintjax_amx_matmul`, amx_matmul.cc) and
`lora_group` (a slot-dense LoRA target group in one call;
`mintjax_lora_group`, lora_group.cc). `available()` says whether this
process can run them; `cpu_kernels.native` builds and registers them.

Why: on this project's 2-core AMX host XLA:CPU runs the M = 16 decode GEMMs
of a bf16 model at ~7 GB/s of weight streaming; these ops stream the
pre-packed weights at ~20-23 GB/s (docs/BENCHMARKS.md, issue 18). Serving
ops (no VJP), CPU only; the Engine uses them for the per-layer bf16 CPU
layout (`EngineConfig.cpu_matmul`), everything else keeps XLA's dots.
`MINTJAX_CPU_AMX=0` turns them off.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels.native import available, why_unavailable  # re-exported

__all__ = ["PackedKernel", "pack", "pack_concat", "unpack", "matmul",
           "lora_group", "available", "why_unavailable"]
_TARGET = "mintjax_amx_matmul"


@flax.struct.dataclass
class PackedKernel:
  """A [d_out, d_in] weight packed for `matmul`: [NB, KC, 4, 16, 32] bf16,
  zero-padded to d_out % 64 == 0 and d_in % 32 == 0.

  packed[nb, kc, t, r, 2 j + p] = W[64 nb + 16 t + j, 32 kc + 2 r + p]: one
  AMX B tile (16 pairs of d_in by 16 outputs) per [t] slice, contiguous, so
  the op reads the weight once, in order.
  """

  packed: jax.Array
  d_out: int = flax.struct.field(pytree_node=False)
  d_in: int = flax.struct.field(pytree_node=False)

  @property
  def dtype(self):
    return self.packed.dtype

  @property
  def shape(self) -> tuple[int, int]:
    """(d_out, d_in) of the weight it holds."""
    return (self.d_out, self.d_in)


def pack(w_out_in) -> PackedKernel:
  """Pack a [d_out, d_in] weight (cast to bf16) for `matmul`. Traceable."""
  w = jnp.asarray(w_out_in)
  if w.ndim != 2:
    raise ValueError(f"pack expects a [d_out, d_in] weight, got shape {w.shape}")
  d_out, d_in = w.shape
  n_pad, k_pad = -d_out % 64, -d_in % 32
  w = jnp.pad(w.astype(jnp.bfloat16), ((0, n_pad), (0, k_pad)))
  nb, kc = w.shape[0] // 64, w.shape[1] // 32
  # [nb, t, j, kc, r, p] -> [nb, kc, t, r, j, p]
  w = w.reshape(nb, 4, 16, kc, 16, 2).transpose(0, 3, 1, 4, 2, 5)
  return PackedKernel(w.reshape(nb, kc, 4, 16, 32), d_out, d_in)


def pack_concat(weights) -> PackedKernel:
  """Several [d_out_i, d_in] weights packed one after another, each padded
  to a multiple of 64 rows (`lora_group`'s expand operand)."""
  parts = [pack(w) for w in weights]
  if len({p.d_in for p in parts}) != 1:
    raise ValueError("pack_concat: the weights must share d_in")
  packed = jnp.concatenate([p.packed for p in parts], axis=0)
  return PackedKernel(packed, packed.shape[0] * 64, parts[0].d_in)


def unpack(kernel: PackedKernel) -> jax.Array:
  """The [d_out, d_in] bf16 weight back (tests, debugging)."""
  nb, kc = kernel.packed.shape[:2]
  w = kernel.packed.reshape(nb, kc, 4, 16, 16, 2).transpose(0, 2, 4, 1, 3, 5)
  return w.reshape(nb * 64, kc * 32)[:kernel.d_out, :kernel.d_in]


def _rows(x, kernel: PackedKernel):
  """x [..., d_in] as the op's bf16 rows [M, 32 KC], zero-padded in d_in."""
  x2 = x.reshape(-1, kernel.d_in).astype(jnp.bfloat16)
  k_pad = kernel.packed.shape[1] * 32 - kernel.d_in
  return jnp.pad(x2, ((0, 0), (0, k_pad))) if k_pad else x2


def matmul(x, kernel: PackedKernel):
  """x [..., d_in] @ W^T -> [..., d_out] float32 (bf16 products, f32 sums).

  Needs `available()`; x is cast to bf16. Only the CPU backend has the op.
  """
  if x.shape[-1] != kernel.d_in:
    raise ValueError(f"matmul: x has d_in {x.shape[-1]}, the packed kernel "
                     f"{kernel.d_in}")
  if not available():
    raise RuntimeError(f"the AMX matmul is unavailable here: "
                       f"{why_unavailable()}")
  lead = x.shape[:-1]
  x2 = _rows(x, kernel)
  out = jax.ShapeDtypeStruct((x2.shape[0], kernel.d_out), jnp.float32)
  y = jax.ffi.ffi_call(_TARGET, out)(x2, kernel.packed)
  return y.reshape(*lead, kernel.d_out)


def lora_group(x, shrink: PackedKernel, expand: PackedKernel,
               d_outs: tuple[int, ...], adapter_idx, scale_a, rank: int):
  """The slot-dense LoRA deltas of one target group in one call.

  Args:
    x: [..., d_in] input (cast to bf16).
    shrink: the group's [n * A * R, d_in] factors, packed.
    expand: the n targets' [d_out_i, A * R] factors, `pack_concat`-ed.
    d_outs: (d_out_1, ..., d_out_n), n <= 3.
    adapter_idx: int32 slots, broadcastable to x's leading dims (e.g.
      [B, 1] for x [B, T, d_in]); 1..A adapt, 0 and anything outside select
      no column (a zero delta).
    scale_a: [A] float32 scale of slots 1..A.
    rank: R, the view's rank width.

  Returns:
    [..., sum(d_outs)] bf16: the targets' deltas side by side, as
    `mintjax.adapters.slot_dense.SlotDenseLayer.deltas` computes them.
  """
  if not available():
    raise RuntimeError(f"the AMX LoRA op is unavailable here: "
                       f"{why_unavailable()}")
  if not 1 <= len(d_outs) <= 3:
    raise ValueError(f"lora_group takes 1 to 3 targets, got {len(d_outs)}")
  if x.shape[-1] != shrink.d_in:
    raise ValueError(f"lora_group: x has d_in {x.shape[-1]}, the shrink "
                     f"{shrink.d_in}")
  if shrink.d_out != len(d_outs) * scale_a.shape[0] * rank:
    raise ValueError("lora_group: the shrink does not hold n * A * R rows")
  lead = x.shape[:-1]
  x2 = _rows(x, shrink)
  idx = jnp.broadcast_to(adapter_idx, lead).reshape(-1).astype(jnp.int32)
  widths = tuple(d_outs) + (0,) * (3 - len(d_outs))
  out = jax.ShapeDtypeStruct((x2.shape[0], sum(d_outs)), jnp.bfloat16)
  y = jax.ffi.ffi_call("mintjax_lora_group", out)(
      x2, shrink.packed, expand.packed, idx, scale_a.astype(jnp.float32),
      rank=np.int64(rank), d_out0=np.int64(widths[0]),
      d_out1=np.int64(widths[1]), d_out2=np.int64(widths[2]))
  return y.reshape(*lead, sum(d_outs))
