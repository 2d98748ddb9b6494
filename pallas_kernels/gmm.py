"""Grouped matmul for mixture-of-experts: the TPU Pallas kernel and its oracle.

Owns `grouped_matmul`, the one entry point the expert FFN uses for
out[m] = lhs[m] @ rhs[group(m) - group_offset] over rows sorted by group,
and `reference`, its dense oracle.

Semantics (all implementations agree, tests check them against each other):
  lhs [M, K] rows sorted by group; group_sizes [G] int32 with
  sum(group_sizes) <= M; rhs [g, K, N] holds groups
  [group_offset, group_offset + g) of the G (g <= G; expert parallelism
  gives a device g = E / n experts of E). Rows of other groups, and rows past
  sum(group_sizes), come out as zeros. Accumulation is float32; the result
  has lhs's dtype. Differentiable in lhs and rhs.

Implementations (`impl`):
  "pallas"    TPU: megablox `gmm` (Pallas/Mosaic; custom_vjp with dlhs = gmm
              on the transposed rhs and drhs = `tgmm`), as shipped inside
              jax (`jax.experimental.pallas.ops.tpu.megablox`). We use it
              rather than writing a second copy or adding tokamax: megablox
              is the kernel tokamax's TPU ragged_dot itself descends from,
              it is versioned with the jax we pin (tokamax 0.0.x is a
              separate pre-1.0 dependency pinned to its own jax range), and
              it already has what expert parallelism needs, `group_offset`
              (compute only the local experts' groups, zero the rest). This
              module adds what it lacks: tile sizes that satisfy the TPU
              block rule for any K, N, padding of M to the row tile, and the
              ragged_dot path with the same offset semantics.
  "ragged_dot" XLA's `jax.lax.ragged_dot` (CPU and GPU).
  "auto"      "pallas" on TPU, else "ragged_dot".
Interpret mode (`interpret=True`) runs the Pallas kernel on CPU for tests;
it is never chosen automatically.

Imports nothing from mintjax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import megablox

IMPLS = ("auto", "pallas", "ragged_dot")
# Row-tile size of the Pallas kernel; M is padded up to a multiple of it.
ROW_TILE = 128


def reference(lhs_mk, rhs_gkn, group_sizes_g, group_offset=0):
  """Dense oracle: each row times its group's matrix, zero outside [off, off+g)."""
  m = lhs_mk.shape[0]
  g = rhs_gkn.shape[0]
  ends = jnp.cumsum(group_sizes_g)
  group_m = jnp.searchsorted(ends, jnp.arange(m), side="right")
  local_m = group_m - group_offset
  valid_m = (local_m >= 0) & (local_m < g) & (jnp.arange(m) < ends[-1])
  w_mkn = rhs_gkn[jnp.clip(local_m, 0, g - 1)]
  out = jnp.einsum("mk,mkn->mn", lhs_mk.astype(jnp.float32),
                   w_mkn.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.where(valid_m[:, None], out, 0).astype(lhs_mk.dtype)


def _check(lhs_mk, rhs_gkn, group_sizes_g):
  if (lhs_mk.ndim != 2 or rhs_gkn.ndim != 3 or group_sizes_g.ndim != 1
      or lhs_mk.shape[1] != rhs_gkn.shape[1]
      or group_sizes_g.shape[0] < rhs_gkn.shape[0]):
    raise ValueError(
        "grouped_matmul expects lhs [M, K], rhs [g, K, N] and group_sizes "
        f"[G >= g]; got lhs {lhs_mk.shape}, rhs {rhs_gkn.shape}, "
        f"group_sizes {group_sizes_g.shape}")
  if not jnp.issubdtype(group_sizes_g.dtype, jnp.integer):
    raise ValueError(
        f"group_sizes must be int32, got {group_sizes_g.dtype}")


def _tile(dim: int) -> int:
  """Largest of 512/256/128 dividing `dim`, else the whole dim (a block equal
  to the array's dim always satisfies the TPU (8, 128) block rule)."""
  for t in (512, 256, 128):
    if dim % t == 0:
      return t
  return dim


def _pallas(lhs_mk, rhs_gkn, group_sizes_g, group_offset, interpret):
  m, k = lhs_mk.shape
  n = rhs_gkn.shape[2]
  tm = ROW_TILE if m >= ROW_TILE else -(-m // 8) * 8
  pad = -m % tm
  # Padding rows form one extra trailing group, outside [off, off + g), so
  # the kernel zeroes them; the group count grows by one (static).
  gs = jnp.concatenate([group_sizes_g.astype(jnp.int32),
                        jnp.full((1,), m - jnp.sum(group_sizes_g) + pad,
                                 jnp.int32)])
  x = jnp.pad(lhs_mk, ((0, pad), (0, 0))) if pad else lhs_mk
  out = megablox.gmm(x, rhs_gkn.astype(lhs_mk.dtype), gs, jnp.float32,
                     (tm, _tile(k), _tile(n)),
                     jnp.asarray(group_offset, jnp.int32).reshape(()),
                     interpret=interpret)
  return out[:m].astype(lhs_mk.dtype)


def _ragged_dot(lhs_mk, rhs_gkn, group_sizes_g, group_offset):
  g = rhs_gkn.shape[0]
  gs = group_sizes_g.astype(jnp.int32)
  if isinstance(group_offset, int) and group_offset == 0:
    # ragged_dot leaves rows past sum(group sizes) zero: exactly the
    # semantics for the groups after the local ones.
    return jax.lax.ragged_dot(lhs_mk, rhs_gkn, gs[:g],
                              preferred_element_type=jnp.float32
                              ).astype(lhs_mk.dtype)
  # Rotate the local groups' rows to the front, multiply, rotate back; the
  # rows that wrapped round sit past the local groups' total and stay zero.
  start = jnp.sum(jnp.where(jnp.arange(gs.shape[0]) < group_offset, gs, 0))
  local = jax.lax.dynamic_slice_in_dim(gs, group_offset, g)
  out = jax.lax.ragged_dot(jnp.roll(lhs_mk, -start, axis=0), rhs_gkn, local,
                           preferred_element_type=jnp.float32)
  return jnp.roll(out, start, axis=0).astype(lhs_mk.dtype)


def grouped_matmul(lhs_mk, rhs_gkn, group_sizes_g, *, group_offset=0,
                   impl: str = "auto", interpret: bool = False):
  """out [M, N] = lhs[m] @ rhs[group(m) - group_offset] (see module doc).

  Args:
    lhs_mk: [M, K] rows sorted by group.
    rhs_gkn: [g, K, N] the matrices of groups [group_offset, group_offset+g).
    group_sizes_g: [G] int32 rows per group, G >= g.
    group_offset: first group held by rhs (int or int32 scalar).
    impl: "auto" | "pallas" | "ragged_dot".
    interpret: run the Pallas kernel in interpret mode (CPU tests).

  Raises:
    ValueError: shapes that do not fit or an unknown impl.
  """
  _check(lhs_mk, rhs_gkn, group_sizes_g)
  if impl not in IMPLS:
    raise ValueError(f"grouped_matmul impl must be one of {IMPLS}, got "
                     f"{impl!r}")
  if impl == "auto":
    impl = "pallas" if jax.default_backend() == "tpu" else "ragged_dot"
  if impl == "pallas":
    return _pallas(lhs_mk, rhs_gkn, group_sizes_g, group_offset, interpret)
  return _ragged_dot(lhs_mk, rhs_gkn, group_sizes_g, group_offset)
