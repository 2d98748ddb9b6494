"""Gather-LoRA kernels for the GPU Pallas backend (Triton lowering).

Owns two kernel families for y[t] = scale[s] * (x[t] @ A[s]) @ B[s],
s = slot[t], slot 0 skipped:

  bgmv          per-token gather (Punica's BGMV), for decode: a shrink
                kernel (one program per token, reads its adapter's A once)
                writes h [T, R] float32; an expand kernel (one program per
                token and output block) reads h and B[s]. The [T, R]
                round trip is a few KB, far below the bank reads.
  grouped_lora  segment-grouped form for prefill and the dx pass of the
                backward: one program per (visit, output block) of the
                metadata visit list, so a tile of tokens of one slot reads
                that slot's A and B once. Visits of a straddling tile store
                only their own rows with a masked store; different slots own
                disjoint rows, so concurrent programs never race.

Triton has no scalar prefetch, so adapters are indexed inside the kernel from
an index input (`a_ref[slot_ref[t]]`-style dynamic slices of whole-array
refs). Every loaded block has power-of-two dims, as Triton requires: block
sizes are the largest powers of two dividing each dim (so no bounds masks are
needed), and a bank whose rank is not a power of two is zero padded to one.
On Hopper, Mosaic GPU (`plgpu.kernel`) is the other supported backend; these
kernels keep to the portable Triton subset so they also run on jax 0.11.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import metadata

try:  # jax >= 0.7 keeps masked stores in the Triton namespace.
  from jax.experimental.pallas import triton as _pltriton
  _masked_store = lambda ref, val, mask: _pltriton.store(ref, val, mask=mask)
except (ImportError, AttributeError):  # pragma: no cover - older jax
  _masked_store = lambda ref, val, mask: pl.store(ref, (), val, mask=mask)

_MIN_DIM = 16  # tl.dot needs every matmul dim >= 16.


def pow2_block(dim: int, preferred: int) -> int:
  """Largest power of two <= `preferred` that divides `dim`."""
  b = 1
  while b * 2 <= preferred and dim % (b * 2) == 0:
    b *= 2
  return b


def supports(d_in: int, d_out: int) -> bool:
  """Whether these kernels lower for a projection of these widths."""
  return d_in % _MIN_DIM == 0 and d_out % _MIN_DIM == 0


def _check_dims(**dims):
  bad = {k: v for k, v in dims.items() if v % _MIN_DIM}
  if bad:
    raise ValueError(
        f"GPU gather-LoRA kernels need feature dims divisible by {_MIN_DIM} "
        f"(power-of-two Triton blocks without bounds masks); got {bad}. Pad "
        "the projection or use impl='gather' for this shape")


def _pad_rank(w, axis: int):
  """Zero pads the rank axis to a power of two (exact: zeros meet zeros)."""
  r = w.shape[axis]
  rp = max(pl.next_power_of_2(r), 1)
  if rp == r:
    return w
  pad = [(0, 0)] * w.ndim
  pad[axis] = (0, rp - r)
  return jnp.pad(w, pad)


def _matmul(a, b):
  """[m, k] @ [k, n] in float32; broadcast-reduce when a dim is < 16."""
  if min(a.shape + b.shape) >= _MIN_DIM:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)
  return jnp.sum(a.astype(jnp.float32)[:, :, None] *
                 b.astype(jnp.float32)[None, :, :], axis=1)


# ------------------------------------------------------------------ BGMV


def _bgmv_shrink_kernel(slot_ref, x_ref, a_ref, h_ref, *, block_k, num_k):
  t = pl.program_id(0)
  slot = slot_ref[t]

  def body(kb, h_r):
    k0 = pl.multiple_of(kb * block_k, block_k)
    x_k = x_ref[t, pl.ds(k0, block_k)].astype(jnp.float32)
    a_kr = a_ref[slot, pl.ds(k0, block_k), :].astype(jnp.float32)
    return h_r + jnp.sum(x_k[:, None] * a_kr, axis=0)

  h_r = jax.lax.fori_loop(0, num_k, body,
                          jnp.zeros((a_ref.shape[2],), jnp.float32))
  h_ref[t, :] = jnp.where(slot != 0, h_r, 0.0)


def _bgmv_expand_kernel(slot_ref, scale_ref, h_ref, b_ref, y_ref, *, block_n):
  t, n = pl.program_id(0), pl.program_id(1)
  slot = slot_ref[t]
  n0 = pl.multiple_of(n * block_n, block_n)
  h_r = h_ref[t, :] * scale_ref[slot]
  b_rn = b_ref[slot, :, pl.ds(n0, block_n)].astype(jnp.float32)
  y_n = jnp.sum(h_r[:, None] * b_rn, axis=0)
  y_ref[t, pl.ds(n0, block_n)] = y_n.astype(y_ref.dtype)


def bgmv(x_td, a_sdr, b_sro, scale_s, slot_t, *, block_k: int = 256,
         block_n: int = 256, interpret=False):
  """Per-token gather-LoRA (decode).

  Args:
    x_td: [T, d_in]; a_sdr: [S, d_in, R]; b_sro: [S, R, d_out];
    scale_s: [S] float32; slot_t: [T] int32.
    block_k / block_n: preferred power-of-two blocks.
    interpret: False on a GPU; True in CPU tests.

  Returns:
    [T, d_out] in x's dtype.
  """
  num_tokens, d_in = x_td.shape
  d_out = b_sro.shape[2]
  _check_dims(d_in=d_in, d_out=d_out)
  a_sdr, b_sro = _pad_rank(a_sdr, 2), _pad_rank(b_sro, 1)
  rank = a_sdr.shape[2]
  bk, bn = pow2_block(d_in, block_k), pow2_block(d_out, block_n)
  h_tr = pl.pallas_call(
      functools.partial(_bgmv_shrink_kernel, block_k=bk, num_k=d_in // bk),
      grid=(num_tokens,),
      out_shape=jax.ShapeDtypeStruct((num_tokens, rank), jnp.float32),
      interpret=interpret,
      name="bgmv_shrink",
  )(slot_t, x_td, a_sdr)
  return pl.pallas_call(
      functools.partial(_bgmv_expand_kernel, block_n=bn),
      grid=(num_tokens, d_out // bn),
      out_shape=jax.ShapeDtypeStruct((num_tokens, d_out), x_td.dtype),
      interpret=interpret,
      name="bgmv_expand",
  )(slot_t, scale_s, h_tr, b_sro)


# --------------------------------------------------------------- grouped


def _grouped_kernel(slot_ref, row_ref, valid_ref, off_ref, scale_ref, x_ref,
                    w1_ref, w2_ref, y0_ref, y_ref, *, tile_rows, block_k,
                    num_k, block_n, transpose):
  del y0_ref  # aliased to y_ref: rows nobody stores stay zero.
  g, n = pl.program_id(0), pl.program_id(1)
  slot = slot_ref[g]
  r0 = pl.multiple_of(row_ref[g] * tile_rows, tile_rows)
  n0 = pl.multiple_of(n * block_n, block_n)

  @pl.when((valid_ref[g] == 1) & (slot != 0))
  def _():
    def shrink(kb, h_mr):
      k0 = pl.multiple_of(kb * block_k, block_k)
      x_mk = x_ref[pl.ds(r0, tile_rows), pl.ds(k0, block_k)]
      if transpose:  # w1 = B [S, R, K]
        w_kr = w1_ref[slot, :, pl.ds(k0, block_k)].T
      else:  # w1 = A [S, K, R]
        w_kr = w1_ref[slot, pl.ds(k0, block_k), :]
      return h_mr + _matmul(x_mk, w_kr.astype(x_mk.dtype))

    rank = w1_ref.shape[1] if transpose else w1_ref.shape[2]
    h_mr = jax.lax.fori_loop(0, num_k, shrink,
                             jnp.zeros((tile_rows, rank), jnp.float32))
    h_mr = (h_mr * scale_ref[slot]).astype(x_ref.dtype)
    if transpose:  # w2 = A [S, N, R]
      w_rn = w2_ref[slot, pl.ds(n0, block_n), :].T
    else:  # w2 = B [S, R, N]
      w_rn = w2_ref[slot, :, pl.ds(n0, block_n)]
    y_mn = _matmul(h_mr, w_rn.astype(h_mr.dtype))
    rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (tile_rows, block_n), 0)
    mask = (rows >= off_ref[slot]) & (rows < off_ref[slot + 1])
    _masked_store(y_ref.at[pl.ds(r0, tile_rows), pl.ds(n0, block_n)],
                  y_mn.astype(y_ref.dtype), mask)


def grouped_lora(x_td, w1, w2, scale_s, slot_t, *, tile_rows: int = 64,
                 transpose: bool = False, block_k: int = 64,
                 block_n: int = 128, interpret=False):
  """Segment-grouped gather-LoRA (prefill; the dx pass with `transpose`).

  Args:
    x_td: [T, K] tokens in their original order.
    w1: [S, K, R] (A), or [S, R, K] (B) with `transpose`.
    w2: [S, R, N] (B), or [S, N, R] (A) with `transpose`.
    scale_s: [S] float32; slot_t: [T] int32.
    tile_rows: rows per visit, a power of two (>= 16 uses tensor cores).
    transpose: read the factors transposed (dx = scale * dy B^T A^T).
    block_k / block_n: preferred power-of-two blocks.
    interpret: False on a GPU; True in CPU tests.

  Returns:
    [T, N] in x's dtype.
  """
  num_tokens, k_dim = x_td.shape
  rank_axis1, rank_axis2 = (1, 2) if transpose else (2, 1)
  n_dim = w2.shape[1] if transpose else w2.shape[2]
  if tile_rows & (tile_rows - 1):
    raise ValueError(f"tile_rows must be a power of two, got {tile_rows}")
  _check_dims(k=k_dim, n=n_dim)
  w1, w2 = _pad_rank(w1, rank_axis1), _pad_rank(w2, rank_axis2)
  num_slots = w1.shape[0]
  meta = metadata.make_group_metadata(slot_t, num_slots, tile_rows)
  x_pk = metadata.sort_rows(x_td, meta, tile_rows)
  bk, bn = pow2_block(k_dim, block_k), pow2_block(n_dim, block_n)
  num_visits = meta.tile_slot_g.shape[0]
  y0 = jnp.zeros((x_pk.shape[0], n_dim), x_td.dtype)
  kernel = functools.partial(
      _grouped_kernel, tile_rows=tile_rows, block_k=bk, num_k=k_dim // bk,
      block_n=bn, transpose=transpose)
  y_pn = pl.pallas_call(
      kernel,
      grid=(num_visits, n_dim // bn),
      out_shape=jax.ShapeDtypeStruct(y0.shape, x_td.dtype),
      input_output_aliases={8: 0},
      interpret=interpret,
      name="grouped_lora_t" if transpose else "grouped_lora",
  )(meta.tile_slot_g, meta.tile_row_g, meta.tile_valid_g,
    meta.group_offsets_s, scale_s, x_pk, w1, w2, y0)
  return metadata.unsort_rows(y_pn, meta)
