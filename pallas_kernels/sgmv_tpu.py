"""Segment-grouped gather-LoRA kernels for TPU (SGMV / gmm style).

Owns two Pallas TPU kernels over tokens sorted by slot (see
`pallas_kernels.metadata`):

  fused_lora  y[p] = scale[s] * (x[p] @ W1[s]) @ W2[s] for every sorted row p
              of slot s. Shrink and expand are fused: the [tile, R]
              intermediate lives in a VMEM scratch and never reaches HBM.
              With `transpose=True` the same kernel reads W1 as [S, R, K]
              and W2 as [S, N, R], i.e. it computes dx = dy @ B^T @ A^T
              straight from the bank without transposing it in HBM.
  tgmm        out[s] = scale[s] * lhs[rows of s]^T @ rhs[rows of s]: the
              grouped transposed matmul behind dA and dB. Only the slots with
              tokens are written; the rest keep the zeros of the aliased
              output buffer.

Both use `pltpu.PrefetchScalarGridSpec`: the visit list (slot and row tile per
grid step) is scalar-prefetched into SMEM, so each step's `index_map` selects
its adapter's blocks before the step runs. A row tile that straddles slots is
visited once per slot and each visit stores only its own rows (masked store);
visits of one tile are consecutive, which keeps output blocks resident in
VMEM between them. Slot 0 (the null adapter), empty slots and padding visits
do no matmul work.

Block choice (checked by Mosaic at lowering, never by interpret mode: a
block's last two dims must be multiples of (8, 128) or span the array):

  - Every feature-width block (K, N, tgmm's M and N) is a multiple of 128
    dividing the width, or the whole width when 128 does not divide it.
    Whole-width blocks rather than padding: the widths of real models that
    128 does not divide are small (576, 192, 960, 320 in SmolLM2), so such a
    block fits VMEM easily, while padding would copy the bank every call.
    (tgmm used to pick M blocks by multiples of 8 only, e.g. 288 of 576,
    which Mosaic refuses: jax.grad failed at d_in 576, 896, 960, 4864, ....)
  - The rank axis is always a whole block, processed in chunks of up to 128
    lanes; chunks at or beyond a slot's true rank (`rank_s`) are skipped, so
    a rank-8 adapter in a rank-256 bank does one chunk of work. Rank-1
    chunks run in float32 (Mosaic fails to verify a bf16 length-1 matmul).
  - The fused kernel's output is tiled over N on the outermost grid axis, as
    wide as `VMEM_BUDGET` allows (`expand_block`): one block for nearly every
    width, several for the widest (e.g. 53,248 at rank 128 would need ~100
    MB of VMEM as one block). Each N block recomputes the [tile, R] shrink,
    which costs K*R per row against the N*R of the expand it serves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.metadata import GroupMetadata

_NUM_PREFETCH = 8  # GroupMetadata.prefetch() (7 vectors) + rank_s.
_RANK_CHUNK = 128  # lanes of one rank chunk (one MXU pass on TPU).
# VMEM the fused kernel's pipelined blocks may take: 16 MiB is the default
# scoped VMEM limit on v4/v5e (v6e: 32 MiB); the rest is Mosaic's own.
VMEM_BUDGET = 12 * 2**20


def pick_block(dim: int, preferred: int, align: int) -> int:
  """Largest block <= `preferred` that divides `dim` and is a multiple of
  `align`; the whole `dim` when there is none (always legal on TPU)."""
  b = (min(preferred, dim) // align) * align
  while b >= align:
    if dim % b == 0:
      return b
    b -= align
  return dim


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(
      a, b, (((contract_a,), (contract_b,)), ((), ())),
      preferred_element_type=jnp.float32)


def _rank_chunks(rank: int):
  """Static (start, size) chunks of the rank axis."""
  return [(c, min(_RANK_CHUNK, rank - c)) for c in range(0, rank, _RANK_CHUNK)]


def _row_mask(row_ref, off_ref, slot, g, tile_rows):
  """[tile_rows, 1] bool: which rows of visit g's tile belong to `slot`."""
  rows = row_ref[g] * tile_rows + jax.lax.broadcasted_iota(
      jnp.int32, (tile_rows, 1), 0)
  return (rows >= off_ref[slot]) & (rows < off_ref[slot + 1])


def _fused_kernel(slot_ref, row_ref, first_ref, sfirst_ref, slast_ref,
                  valid_ref, off_ref, rank_ref, scale_ref, x_ref, w1_ref,
                  w2_ref, y_ref, h_ref, acc_ref, *, transpose: bool,
                  tile_rows: int, block_n: int, rank: int):
  del sfirst_ref, slast_ref  # The forward needs only per-tile flags.
  j, g, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  slot = slot_ref[g]
  slot_rank = rank_ref[slot]
  active = (valid_ref[g] == 1) & (slot != 0) & (slot_rank > 0)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active)
  def _():
    for c0, cn in _rank_chunks(rank):
      @pl.when(c0 < slot_rank)
      def _():
        # Mosaic lowers a bf16 matmul with a length-1 side to a broadcast
        # whose element types disagree (fails to verify): rank 1 runs in f32.
        dt = jnp.float32 if cn == 1 else x_ref.dtype
        x = x_ref[...].astype(dt)
        if transpose:  # w1 block [1, R, tk]: contract over tk.
          part = _dot(x, w1_ref[0, c0:c0 + cn, :].astype(dt), 1, 1)
        else:  # w1 block [1, tk, R].
          part = _dot(x, w1_ref[0, :, c0:c0 + cn].astype(dt), 1, 0)
        acc_ref[:, c0:c0 + cn] += part

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    @pl.when(first_ref[g] == 1)
    def _():
      y_ref[...] = jnp.zeros_like(y_ref)
      h_ref[...] = jnp.zeros_like(h_ref)

    @pl.when(active)
    def _():
      mask = _row_mask(row_ref, off_ref, slot, g, tile_rows)
      h = acc_ref[...]

      # Only the first N block stores h; later ones write a spare tile.
      @pl.when(j == 0)
      def _():
        h_ref[...] = jnp.where(mask, h, h_ref[...])

      hs = (h * scale_ref[slot]).astype(y_ref.dtype)
      n_total = y_ref.shape[1]

      def expand(j, carry):
        n0 = pl.multiple_of(j * block_n, block_n)
        y = jnp.zeros((tile_rows, block_n), jnp.float32)
        for c0, cn in _rank_chunks(rank):
          # Rank 1 in float32, as in the shrink above.
          dt = jnp.float32 if cn == 1 else hs.dtype
          h_c = hs[:, c0:c0 + cn].astype(dt)
          if transpose:  # w2 block [1, bn, R]: contract over R.
            w = w2_ref[0, pl.ds(n0, block_n), c0:c0 + cn]
            part = _dot(h_c, w.astype(dt), 1, 1)
          else:  # w2 block [1, R, bn].
            w = w2_ref[0, c0:c0 + cn, pl.ds(n0, block_n)]
            part = _dot(h_c, w.astype(dt), 1, 0)
          y = y + jnp.where(c0 < slot_rank, part, 0.0)
        old = y_ref[:, pl.ds(n0, block_n)]
        y_ref[:, pl.ds(n0, block_n)] = jnp.where(mask, y.astype(old.dtype),
                                                 old)
        return carry

      jax.lax.fori_loop(0, n_total // block_n, expand, 0)


def _padded(n: int, to: int) -> int:
  return -(-n // to) * to


def expand_block(n_dim: int, *, fixed_bytes: int, bytes_per_col: int,
                 budget: int | None = None) -> int:
  """The N block of `fused_lora`'s grid: as wide as the VMEM budget allows.

  A multiple of 128 dividing `n_dim` (the TPU block rule), the largest whose
  `fixed_bytes + block * bytes_per_col` fits `budget`, but at least 128. An
  `n_dim` that is not a multiple of 128 can only be one whole block (the
  rule allows no other split); every such width of a real model is < 1,024.
  """
  if n_dim % 128:
    return n_dim
  budget = VMEM_BUDGET if budget is None else budget
  best = 128
  for b in range(128, n_dim + 1, 128):
    if n_dim % b == 0 and fixed_bytes + b * bytes_per_col <= budget:
      best = b
  return best


def fused_lora(x_pk, w1, w2, scale_s, rank_s, meta: GroupMetadata, *,
               tile_rows: int, transpose: bool = False, block_k: int = 512,
               block_n: int = 512, interpret=False):
  """scale[s] * (x @ W1[s]) @ W2[s] over slot-sorted rows, fused.

  Args:
    x_pk: [P, K] slot-sorted rows (`metadata.sort_rows`), P a multiple of
      `tile_rows`.
    w1: [S, K, R] shrink factors, or [S, R, K] with `transpose`.
    w2: [S, R, N] expand factors, or [S, N, R] with `transpose`.
    scale_s: [S] float32 per-slot scale.
    rank_s: [S] int32 true rank per slot (<= R); 0 skips the slot.
    meta: metadata built with the same `tile_rows`.
    tile_rows: rows per tile (a multiple of 8).
    transpose: read W1/W2 transposed (the dx pass of the backward).
    block_k: preferred K block (multiple of 128, or K).
    block_n: preferred N chunk of the in-kernel expand loop.
    interpret: False on TPU; `pltpu.InterpretParams()` or True in tests.

  Returns:
    (y_pn [P, N] in x's dtype, h_pr [P, R] float32 unscaled x @ W1[s]).
    Rows of slot 0, empty rows and padding rows are zero.
  """
  p, k_dim = x_pk.shape
  num_slots = w1.shape[0]
  if transpose:
    rank, n_dim = w1.shape[1], w2.shape[1]
    w_k, w_r = w1.shape[2], w2.shape[2]
  else:
    rank, n_dim = w1.shape[2], w2.shape[2]
    w_k, w_r = w1.shape[1], w2.shape[1]
  if w_k != k_dim or w_r != rank or p % tile_rows or tile_rows % 8:
    raise ValueError(
        f"fused_lora shapes disagree: x {x_pk.shape}, w1 {w1.shape}, w2 "
        f"{w2.shape}, tile_rows {tile_rows} (transpose={transpose}); expected "
        "x [P, K] with P a multiple of tile_rows (itself a multiple of 8), "
        "w1 [S, K, R] and w2 [S, R, N] (or [S, R, K] / [S, N, R] transposed)")
  del num_slots
  tk = pick_block(k_dim, block_k, 128)
  # VMEM bytes of the pipelined blocks (x2: double buffering), with the rank
  # padded to whole (8, 128) tiles as VMEM stores it.
  x_b, w_b = x_pk.dtype.itemsize, w1.dtype.itemsize
  r_pad = _padded(rank, 128)
  fixed = (2 * tile_rows * _padded(tk, 128) * x_b + 2 * tk * r_pad * w_b
           + 3 * tile_rows * r_pad * 4)
  bn = expand_block(n_dim, fixed_bytes=fixed,
                    bytes_per_col=2 * r_pad * w_b + 2 * tile_rows * x_b)
  tn = pick_block(bn, block_n, 128)
  grid = (n_dim // bn, meta.tile_slot_g.shape[0], k_dim // tk)

  def x_map(j, g, k, slot, row, *_):
    del j
    return row[g], k

  if transpose:
    w1_spec = pl.BlockSpec((1, rank, tk),
                           lambda j, g, k, slot, *_: (slot[g], 0, k))
    w2_spec = pl.BlockSpec((1, bn, rank),
                           lambda j, g, k, slot, *_: (slot[g], j, 0))
  else:
    w1_spec = pl.BlockSpec((1, tk, rank),
                           lambda j, g, k, slot, *_: (slot[g], k, 0))
    w2_spec = pl.BlockSpec((1, rank, bn),
                           lambda j, g, k, slot, *_: (slot[g], 0, j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=_NUM_PREFETCH,
      grid=grid,
      in_specs=[
          pl.BlockSpec(memory_space=pltpu.SMEM),
          pl.BlockSpec((tile_rows, tk), x_map),
          w1_spec,
          w2_spec,
      ],
      out_specs=[
          pl.BlockSpec((tile_rows, bn), lambda j, g, k, slot, row, *_:
                       (row[g], j)),
          # h is the same for every N block: N block 0 stores it and the
          # others write one spare tile past the end, so no output block is
          # revisited after another was (the TPU pipelining rule).
          pl.BlockSpec((tile_rows, rank), lambda j, g, k, slot, row, *_:
                       (jnp.where(j == 0, row[g], p // tile_rows), 0)),
      ],
      scratch_shapes=[pltpu.VMEM((tile_rows, rank), jnp.float32)],
  )
  kernel = functools.partial(_fused_kernel, transpose=transpose,
                             tile_rows=tile_rows, block_n=tn, rank=rank)
  y_pn, h_pr = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((p, n_dim), x_pk.dtype),
                 jax.ShapeDtypeStruct((p + tile_rows, rank), jnp.float32)],
      # Visits of one row tile must run in order on one core (they share an
      # output block), so no axis is marked parallel.
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("arbitrary", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="sgmv_fused_lora",
  )(*meta.prefetch(), rank_s.astype(jnp.int32), scale_s.astype(jnp.float32),
    x_pk, w1, w2)
  return y_pn, h_pr[:p]


def _tgmm_kernel(slot_ref, row_ref, first_ref, sfirst_ref, slast_ref,
                 valid_ref, off_ref, rank_ref, scale_ref, lhs_ref, rhs_ref,
                 zeros_ref, out_ref, acc_ref, *, tile_rows: int):
  del first_ref, rank_ref, zeros_ref  # zeros_ref is aliased to out.
  g = pl.program_id(2)
  slot = slot_ref[g]
  active = (valid_ref[g] == 1) & (slot != 0)

  @pl.when(sfirst_ref[g] == 1)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active)
  def _():
    mask = _row_mask(row_ref, off_ref, slot, g, tile_rows)
    lhs = jnp.where(mask, lhs_ref[...], jnp.zeros_like(lhs_ref))
    rhs = rhs_ref[...].astype(lhs.dtype)
    acc_ref[...] += _dot(lhs, rhs, 0, 0)

  @pl.when(slast_ref[g] == 1)
  def _():
    # Slot 0 ends with a zero accumulator: its gradient is zero by definition.
    out_ref[0] = (acc_ref[...] * scale_ref[slot]).astype(out_ref.dtype)


def tgmm(lhs_pm, rhs_pn, scale_s, meta: GroupMetadata, *, num_slots: int,
         tile_rows: int, out_dtype, block_m: int = 512, block_n: int = 512,
         interpret=False):
  """out[s] = scale[s] * lhs[rows of s]^T @ rhs[rows of s] (dA / dB).

  Args:
    lhs_pm: [P, M] slot-sorted rows.
    rhs_pn: [P, N] slot-sorted rows.
    scale_s: [S] float32.
    meta: metadata built with the same `tile_rows`.
    num_slots: S.
    tile_rows: rows per tile.
    out_dtype: dtype of the result (the bank's dtype).
    block_m / block_n: preferred output blocks (M blocks are multiples of 8,
      N blocks multiples of 128, or whole).
    interpret: as in `fused_lora`.

  Returns:
    [S, M, N]; slots without tokens, and slot 0, are zero.
  """
  p, m_dim = lhs_pm.shape
  n_dim = rhs_pn.shape[1]
  if rhs_pn.shape[0] != p or p % tile_rows:
    raise ValueError(
        f"tgmm expects lhs [P, M] and rhs [P, N] with the same P, a multiple "
        f"of tile_rows={tile_rows}; got {lhs_pm.shape} and {rhs_pn.shape}")
  bm = pick_block(m_dim, block_m, 128)
  bn = pick_block(n_dim, block_n, 128)
  grid = (m_dim // bm, n_dim // bn, meta.tile_slot_g.shape[0])
  rank_s = jnp.zeros((num_slots,), jnp.int32)  # unused; keeps one prefetch set
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=_NUM_PREFETCH,
      grid=grid,
      in_specs=[
          pl.BlockSpec(memory_space=pltpu.SMEM),
          pl.BlockSpec((tile_rows, bm), lambda i, j, g, slot, row, *_: (row[g], i)),
          pl.BlockSpec((tile_rows, bn), lambda i, j, g, slot, row, *_: (row[g], j)),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((1, bm, bn),
                             lambda i, j, g, slot, *_: (slot[g], i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
  )
  zeros = jnp.zeros((num_slots, m_dim, n_dim), out_dtype)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tile_rows=tile_rows),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((num_slots, m_dim, n_dim), out_dtype),
      # Argument 11 (after 8 prefetch vectors, scale, lhs, rhs) is `zeros`:
      # slots never visited keep its zeros.
      input_output_aliases={_NUM_PREFETCH + 3: 0},
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="sgmv_tgmm",
  )(*meta.prefetch(), rank_s, scale_s.astype(jnp.float32), lhs_pm, rhs_pn,
    zeros)
