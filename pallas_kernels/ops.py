"""Differentiable gather-LoRA ops over the Pallas kernels, and their dispatch.

Owns the `jax.custom_vjp` wrappers and `KERNELS`, the table of named kernels
that `mintjax.adapters.lora_op` reads when it selects an implementation
(the op finds kernels by name; this package imports nothing from mintjax):

  sgmv_lora  TPU segment-grouped kernel (`sgmv_tpu.fused_lora`).
             backward: dx = the same fused kernel reading the bank
             transposed; dA, dB = `sgmv_tpu.tgmm` (writes only the slots
             present); dscale from the saved per-row intermediates.
  gpu_lora   GPU kernels (`gpu.bgmv` for decode-sized batches, `gpu.grouped`
             for prefill). backward: dx through `gpu.grouped` on the
             transposed bank; dA, dB through XLA's grouped transposed matmul
             (`jax.lax.ragged_dot_general`), since Triton has no
             scalar-prefetch visit list to write slots in place.

Both compute y[t] = scale[slot[t]] * (x[t] @ A[slot[t]]) @ B[slot[t]] with
slot 0 skipped, and agree with `pallas_kernels.reference`.

Names in `KERNELS` (token level, see `lora_op.register`):
  pallas_sgmv            chosen automatically on 'tpu'
  pallas_gpu             chosen automatically on 'gpu'
  pallas_sgmv_interpret  explicit only (tests): TPU interpret mode
  pallas_gpu_interpret   explicit only (tests): generic interpret mode
Interpret mode is never chosen by `select_impl`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import gpu, metadata, sgmv_tpu

# Interpret modes are named by strings so they can be static, hashable
# custom_vjp arguments: "" (compile for the device), "tpu" (TPU semantics:
# uninitialised memory reads as NaN, so a missed store is caught), "generic".
_INTERPRET_MODES = ("", "tpu", "generic")


def _interpret_arg(mode: str):
  if mode not in _INTERPRET_MODES:
    raise ValueError(f"interpret mode must be one of {_INTERPRET_MODES}, got "
                     f"{mode!r}")
  return {"": False, "tpu": pltpu.InterpretParams(), "generic": True}[mode]


def _check_args(x_td, a_sdr, b_sro, scale_s, slot_t):
  s, d_in, r = a_sdr.shape
  if (x_td.ndim != 2 or x_td.shape[1] != d_in or b_sro.shape[:2] != (s, r)
      or scale_s.shape != (s,) or slot_t.shape != x_td.shape[:1]):
    raise ValueError(
        "gather-LoRA kernel expects x [T, d_in], A [S, d_in, R], "
        "B [S, R, d_out], scale [S] and slot [T]; got x "
        f"{x_td.shape}, A {a_sdr.shape}, B {b_sro.shape}, scale "
        f"{scale_s.shape}, slot {slot_t.shape}")


def _dscale(h_pr, g_pr, meta, num_slots):
  """d scale[s] = sum over rows of s of <x A[s], dy B[s]^T> (unscaled)."""
  num_tokens = meta.order_t.shape[0]
  row_dot = jnp.sum(h_pr[:num_tokens] * g_pr[:num_tokens], axis=1)
  sorted_slot = jnp.repeat(jnp.arange(num_slots, dtype=jnp.int32),
                           meta.group_sizes_s, total_repeat_length=num_tokens)
  return jax.ops.segment_sum(row_dot, sorted_slot, num_segments=num_slots)


# ---------------------------------------------------------------- TPU (SGMV)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _sgmv(x_td, a_sdr, b_sro, scale_s, slot_t, rank_s, tile_rows, interpret):
  return _sgmv_fwd(x_td, a_sdr, b_sro, scale_s, slot_t, rank_s, tile_rows,
                   interpret)[0]


def _sgmv_fwd(x_td, a_sdr, b_sro, scale_s, slot_t, rank_s, tile_rows,
              interpret):
  meta = metadata.make_group_metadata(slot_t, a_sdr.shape[0], tile_rows)
  x_pk = metadata.sort_rows(x_td, meta, tile_rows)
  y_pn, h_pr = sgmv_tpu.fused_lora(
      x_pk, a_sdr, b_sro, scale_s, rank_s, meta, tile_rows=tile_rows,
      interpret=_interpret_arg(interpret))
  y_tn = metadata.unsort_rows(y_pn, meta)
  return y_tn, (x_pk, h_pr, a_sdr, b_sro, scale_s, rank_s, meta)


def _sgmv_bwd(tile_rows, interpret, res, dy_tn):
  x_pk, h_pr, a_sdr, b_sro, scale_s, rank_s, meta = res
  num_slots = a_sdr.shape[0]
  mode = _interpret_arg(interpret)
  dy_pn = metadata.sort_rows(dy_tn.astype(x_pk.dtype), meta, tile_rows)
  # dx = scale * (dy @ B^T) @ A^T: the forward kernel reading B as the shrink
  # factor and A as the expand factor; g = dy @ B^T comes back unscaled.
  dx_pk, g_pr = sgmv_tpu.fused_lora(
      dy_pn, b_sro, a_sdr, scale_s, rank_s, meta, tile_rows=tile_rows,
      transpose=True, interpret=mode)
  da = sgmv_tpu.tgmm(x_pk, g_pr, scale_s, meta, num_slots=num_slots,
                     tile_rows=tile_rows, out_dtype=a_sdr.dtype,
                     interpret=mode)
  db = sgmv_tpu.tgmm(h_pr, dy_pn, scale_s, meta, num_slots=num_slots,
                     tile_rows=tile_rows, out_dtype=b_sro.dtype,
                     interpret=mode)
  dscale = _dscale(h_pr, g_pr, meta, num_slots).astype(scale_s.dtype)
  dx = metadata.unsort_rows(dx_pk, meta)
  return dx, da, db, dscale, None, None


_sgmv.defvjp(_sgmv_fwd, _sgmv_bwd)


def sgmv_lora(x_td, a_sdr, b_sro, scale_s, slot_t, rank_s=None, *,
              tile_rows: int = 128, interpret: str = ""):
  """Segment-grouped gather-LoRA (TPU kernel), differentiable.

  Args:
    x_td: [T, d_in] tokens.
    a_sdr: [S, d_in, R] A factors (slot 0 is the null adapter).
    b_sro: [S, R, d_out] B factors.
    scale_s: [S] float32 per-slot scale.
    slot_t: [T] int32 slot of each token.
    rank_s: optional [S] int32 true ranks; rank chunks beyond a slot's rank
      are skipped. Defaults to R for every slot.
    tile_rows: sorted rows per tile (multiple of 8; 128 suits the MXU).
    interpret: '' on a TPU; 'tpu' to interpret with TPU semantics (tests).

  Returns:
    [T, d_out] in x's dtype.
  """
  _check_args(x_td, a_sdr, b_sro, scale_s, slot_t)
  if rank_s is None:
    rank_s = jnp.full((a_sdr.shape[0],), a_sdr.shape[2], jnp.int32)
  return _sgmv(x_td, a_sdr, b_sro, scale_s.astype(jnp.float32),
               slot_t.astype(jnp.int32), rank_s.astype(jnp.int32), tile_rows,
               interpret)


# ---------------------------------------------------------------------- GPU

# At or below this many tokens the per-token gather kernel runs (decode);
# above it, tokens are grouped so each adapter is read once per tile.
DECODE_MAX_TOKENS = 256


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gpu(x_td, a_sdr, b_sro, scale_s, slot_t, tile_rows, interpret):
  return _gpu_fwd(x_td, a_sdr, b_sro, scale_s, slot_t, tile_rows,
                  interpret)[0]


def _gpu_fwd(x_td, a_sdr, b_sro, scale_s, slot_t, tile_rows, interpret):
  mode = _interpret_arg(interpret)
  if x_td.shape[0] <= DECODE_MAX_TOKENS:
    y = gpu.bgmv(x_td, a_sdr, b_sro, scale_s, slot_t, interpret=mode)
  else:
    y = gpu.grouped_lora(x_td, a_sdr, b_sro, scale_s, slot_t,
                         tile_rows=tile_rows, interpret=mode)
  return y, (x_td, a_sdr, b_sro, scale_s, slot_t)


def _gpu_bwd(tile_rows, interpret, res, dy_to):
  x_td, a_sdr, b_sro, scale_s, slot_t = res
  num_slots = a_sdr.shape[0]
  dy_to = dy_to.astype(x_td.dtype)
  dx = gpu.grouped_lora(dy_to, b_sro, a_sdr, scale_s, slot_t,
                        tile_rows=tile_rows, transpose=True,
                        interpret=_interpret_arg(interpret))
  # dA, dB: grouped transposed matmuls over slot-sorted tokens. Slot 0 is
  # masked out so the null adapter never receives a gradient.
  meta = metadata.make_group_metadata(slot_t, num_slots, tile_rows)
  keep_t = (slot_t != 0)[:, None]
  x_s = jnp.take(jnp.where(keep_t, x_td, 0), meta.order_t, axis=0)
  dy_s = jnp.take(dy_to, meta.order_t, axis=0)
  f32 = jnp.float32
  h_s = jax.lax.ragged_dot(x_s.astype(f32), a_sdr.astype(f32),
                           meta.group_sizes_s)
  g_s = jax.lax.ragged_dot(dy_s.astype(f32),
                           jnp.swapaxes(b_sro, 1, 2).astype(f32),
                           meta.group_sizes_s)
  ragged_t = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  da = jax.lax.ragged_dot_general(x_s.astype(f32), g_s, meta.group_sizes_s,
                                  ragged_t)
  db = jax.lax.ragged_dot_general(h_s, dy_s.astype(f32), meta.group_sizes_s,
                                  ragged_t)
  scale32 = scale_s.astype(f32)[:, None, None]
  dscale = _dscale(h_s, g_s, meta, num_slots)
  return (dx, (da * scale32).astype(a_sdr.dtype),
          (db * scale32).astype(b_sro.dtype), dscale.astype(scale_s.dtype),
          None)


_gpu.defvjp(_gpu_fwd, _gpu_bwd)


def gpu_lora(x_td, a_sdr, b_sro, scale_s, slot_t, rank_s=None, *,
             tile_rows: int = 64, interpret: str = ""):
  """Gather-LoRA on the GPU Pallas kernels (Triton lowering), differentiable.

  Args: as `sgmv_lora`. `rank_s` is accepted for the common interface and
  not used: Triton blocks span the whole (power-of-two padded) rank, and
  zero padding is exact. `tile_rows` must be a power of two; `interpret` is
  '' on a GPU and 'generic' in CPU tests.
  """
  del rank_s
  _check_args(x_td, a_sdr, b_sro, scale_s, slot_t)
  return _gpu(x_td, a_sdr, b_sro, scale_s.astype(jnp.float32),
              slot_t.astype(jnp.int32), tile_rows, interpret)


# ---------------------------------------------------------------- dispatch


class KernelEntry(NamedTuple):
  """One named kernel as the op sees it.

  token_impl: `(x_td, a_sdr, b_sro, scale_s, slot_t, rank_s) -> y_to`.
  backends: backends ('tpu', 'gpu') on which the op may choose it.
  supports: `(d_in, d_out) -> bool`, the widths it lowers for.
  """
  token_impl: Callable
  backends: tuple[str, ...] = ()
  supports: Callable[[int, int], bool] = lambda d_in, d_out: True


# Interpret-mode entries name no backend, so they run only when a caller
# asks for them by name (tests); they are never selected automatically.
KERNELS: dict[str, KernelEntry] = {
    "pallas_sgmv": KernelEntry(sgmv_lora, ("tpu",)),
    "pallas_gpu": KernelEntry(gpu_lora, ("gpu",), gpu.supports),
    "pallas_sgmv_interpret": KernelEntry(
        functools.partial(sgmv_lora, tile_rows=8, interpret="tpu")),
    "pallas_gpu_interpret": KernelEntry(
        functools.partial(gpu_lora, tile_rows=16, interpret="generic")),
}
