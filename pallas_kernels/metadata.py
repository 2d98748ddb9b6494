"""Group metadata shared by every gather-LoRA kernel.

Owns `GroupMetadata` and `make_group_metadata`: from a token→slot vector it
builds, in pure jit-able JAX with static shapes, everything a segment-grouped
kernel needs to walk tokens slot by slot:

  order_t          stable sort of tokens by slot (sorted position → token)
  inverse_t        its inverse (token → sorted position)
  group_sizes_s    tokens per slot
  group_offsets_s  first sorted row of each slot, plus the total at the end
  tile_*_g         the visit list: one entry per (row tile, slot) pair that
                   has at least one token, in row-tile order, padded to a
                   static length with inert entries.

Why a visit list: a row tile of `tile_rows` sorted tokens may straddle
several slots. Each (row tile, slot) pair becomes one grid step that loads
that slot's factors and stores only the rows that belong to it (a masked
store). Entries for one row tile are consecutive, so a kernel's output block
is revisited only on consecutive steps (the TPU pipelining rule), and entries
for one slot are consecutive too (what the transposed dA/dB kernel needs to
accumulate a slot's gradient in one place).

The number of visits is at most `row_tiles + min(S, T) - 1`: every non-empty
slot after the first can add at most one partial tile.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupMetadata(NamedTuple):
  """Token grouping and the tile visit list (see the module docstring).

  Shapes: T tokens, S slots, G = `max_visits(T, S, tile_rows)` visits.

  Attributes:
    order_t: [T] int32, sorted row p holds original token order_t[p].
    inverse_t: [T] int32, original token t sits at sorted row inverse_t[t].
    group_sizes_s: [S] int32 tokens per slot.
    group_offsets_s: [S + 1] int32, slot s owns sorted rows
      [group_offsets_s[s], group_offsets_s[s + 1]).
    tile_slot_g: [G] int32 slot of each visit.
    tile_row_g: [G] int32 row-tile index of each visit.
    tile_first_g: [G] int32, 1 on the first visit of a row tile.
    tile_slot_first_g: [G] int32, 1 on the first visit of a slot.
    tile_slot_last_g: [G] int32, 1 on the last visit of a slot.
    tile_valid_g: [G] int32, 0 on padding visits (they repeat the last real
      visit's tile and slot and must not change any output).
    num_visits: [] int32 number of real visits.
  """

  order_t: jax.Array
  inverse_t: jax.Array
  group_sizes_s: jax.Array
  group_offsets_s: jax.Array
  tile_slot_g: jax.Array
  tile_row_g: jax.Array
  tile_first_g: jax.Array
  tile_slot_first_g: jax.Array
  tile_slot_last_g: jax.Array
  tile_valid_g: jax.Array
  num_visits: jax.Array

  def prefetch(self) -> tuple[jax.Array, ...]:
    """The per-visit int32 vectors kernels read as scalars, in a fixed order:
    (slot, row, first, slot_first, slot_last, valid, group_offsets)."""
    return (self.tile_slot_g, self.tile_row_g, self.tile_first_g,
            self.tile_slot_first_g, self.tile_slot_last_g, self.tile_valid_g,
            self.group_offsets_s)


def row_tiles(num_tokens: int, tile_rows: int) -> int:
  """Number of `tile_rows`-row tiles covering `num_tokens` sorted rows."""
  return max(1, -(-num_tokens // tile_rows))


def max_visits(num_tokens: int, num_slots: int, tile_rows: int) -> int:
  """Static length G of the visit list (see the module docstring)."""
  return row_tiles(num_tokens, tile_rows) + min(num_slots, num_tokens) - 1


def make_group_metadata(slot_t: jax.Array, num_slots: int, tile_rows: int
                        ) -> GroupMetadata:
  """Groups tokens by slot and builds the tile visit list.

  Args:
    slot_t: [T] int32 slot of every token, each in [0, num_slots).
    num_slots: S, the bank's slot count (static).
    tile_rows: rows per tile (static), e.g. 128 on TPU.

  Returns:
    `GroupMetadata`; every array has a static shape, so this runs under jit.

  Raises:
    ValueError: a non-1-D slot vector or a non-positive tile size.
  """
  if slot_t.ndim != 1:
    raise ValueError(
        f"slot_t must be a 1-D [T] vector of slots, got shape {slot_t.shape}; "
        "flatten [B, T] batches to tokens first")
  if tile_rows <= 0 or num_slots <= 0:
    raise ValueError(
        f"tile_rows and num_slots must be positive, got tile_rows="
        f"{tile_rows}, num_slots={num_slots}")
  num_tokens = slot_t.shape[0]
  slot_t = slot_t.astype(jnp.int32)
  order_t = jnp.argsort(slot_t, stable=True).astype(jnp.int32)
  inverse_t = jnp.zeros_like(order_t).at[order_t].set(
      jnp.arange(num_tokens, dtype=jnp.int32))
  group_sizes_s = jnp.bincount(slot_t, length=num_slots).astype(jnp.int32)
  ends_s = jnp.cumsum(group_sizes_s, dtype=jnp.int32)
  starts_s = ends_s - group_sizes_s
  group_offsets_s = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_s])

  # Row tiles touched by each slot: from the tile holding its first row to
  # the tile holding its last row; empty slots touch none.
  nonempty_s = group_sizes_s > 0
  first_tile_s = starts_s // tile_rows
  last_tile_s = jnp.maximum(ends_s - 1, 0) // tile_rows
  visits_s = jnp.where(nonempty_s, last_tile_s - first_tile_s + 1, 0)
  visit_ends_s = jnp.cumsum(visits_s, dtype=jnp.int32)
  num_visits = visit_ends_s[-1]

  g = max_visits(num_tokens, num_slots, tile_rows)
  visit_g = jnp.arange(g, dtype=jnp.int32)
  # Padding visits repeat the last real one: same tile and slot keep the
  # output block index unchanged, so nothing is written back twice.
  clamped_g = jnp.minimum(visit_g, num_visits - 1)
  slot_g = jnp.searchsorted(visit_ends_s, clamped_g, side="right").astype(
      jnp.int32)
  slot_g = jnp.minimum(slot_g, num_slots - 1)
  within_g = clamped_g - (visit_ends_s[slot_g] - visits_s[slot_g])
  row_g = first_tile_s[slot_g] + within_g
  valid_g = (visit_g < num_visits).astype(jnp.int32)
  prev_row_g = jnp.concatenate([jnp.full((1,), -1, jnp.int32), row_g[:-1]])
  first_g = ((row_g != prev_row_g) & (valid_g == 1)).astype(jnp.int32)
  prev_slot_g = jnp.concatenate([jnp.full((1,), -1, jnp.int32), slot_g[:-1]])
  slot_first_g = ((slot_g != prev_slot_g) & (valid_g == 1)).astype(jnp.int32)
  slot_last_g = ((within_g == visits_s[slot_g] - 1) & (valid_g == 1)).astype(
      jnp.int32)
  return GroupMetadata(
      order_t=order_t, inverse_t=inverse_t, group_sizes_s=group_sizes_s,
      group_offsets_s=group_offsets_s, tile_slot_g=slot_g, tile_row_g=row_g,
      tile_first_g=first_g, tile_slot_first_g=slot_first_g,
      tile_slot_last_g=slot_last_g, tile_valid_g=valid_g,
      num_visits=num_visits)


def sort_rows(x_td: jax.Array, meta: GroupMetadata, tile_rows: int
              ) -> jax.Array:
  """Tokens in slot order, zero padded to whole row tiles: [row_tiles*tm, d]."""
  num_tokens = x_td.shape[0]
  padded = row_tiles(num_tokens, tile_rows) * tile_rows
  x_sorted = jnp.take(x_td, meta.order_t, axis=0)
  return jnp.pad(x_sorted, ((0, padded - num_tokens), (0, 0)))


def unsort_rows(y_pd: jax.Array, meta: GroupMetadata) -> jax.Array:
  """Inverse of `sort_rows`: [padded, d] in slot order → [T, d] token order."""
  return jnp.take(y_pd, meta.inverse_t, axis=0)
