"""The slot-dense view of the bank: every slot's factors side by side, per layer.

Owns `SlotDenseBank` / `SlotDenseLayer` (a read-only serving view of an
`AdapterBank`), `slot_dense_view` (the relayout, jitted once per rank width)
and `SlotDenseCache` (one view per bank version and rank width).

Layout per layer l (A = S - 1 adapter slots: the null slot 0 is all zeros
and left out, so a base row selects no column; R the view's rank width; n
targets of a group that read one input, e.g. q/k/v or gate/up):

  shrink[group]: [n * A * R, d_in]   target i's slot s at rows
                                     (i * A + s - 1) * R ... + R
  expand[t]:     [d_out, A * R]      slot s's B at columns (s - 1) * R ... + R

(both [out, in], the order XLA:CPU's small-M GEMMs read fastest), so a
layer's LoRA is two plain GEMMs per group, and a row picks its slot's
columns of h with a mask:

  h = x @ shrink.T      y_t = where(row's slot, h_t * scale, 0) @ expand[t].T

Why: the per-row gather (`lora_op.gather`) copies each row's A and B out of
the [S, L, ...] bank every layer and step (three passes over B adapters'
bytes: read, write, read again); on XLA:CPU those gathers cost as much as
the base model's matmuls at decode (docs/BENCHMARKS.md). Here every resident
adapter is read once per step, by the GEMMs themselves, so the view pays off
when the bank's slots are not many more than the batch's rows (the engine
uses it when S <= 4 B). The view is rebuilt only when the bank changes (an
adapter is loaded), never per step.

Exactness and isolation: the mask is a `where`, not a product, so another
slot's columns contribute exact zeros whatever their values; the null slot 0
is left out, so base rows get a zero delta. Summation order differs from
the gather's, so results agree to float rounding, not bit for bit.

With `packed=True` (the Engine's AMX layout, `cpu_kernels.amx`) a group's
shrink is an AMX `PackedKernel` and its targets' expands one packed operand,
and the whole group (shrink, mask, scale, expands, roundings) runs as one
native call, `amx.lora_group`.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import amx
from mintjax.adapters.bank import AdapterBank

# Targets the view holds: the dense projections (expert and MLA targets keep
# the stacked bank and its gather).
DENSE_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _key(group: tuple[str, ...]) -> str:
  return "+".join(group)


@flax.struct.dataclass
class SlotDenseLayer:
  """One layer of the view (see the module docstring).

  Attributes:
    shrink: {group key 'q+k+v': [n * A * R, d_in]}.
    expand: {target: [d_out, A * R]} (values None in the packed view).
    scale: [A] float32 scale of slots 1 .. A.
    groups: the target groups, each sharing one input (static).
    packed_expand: the packed view's expands, {group key: the group's
      targets' [d_out, A * R] `amx.pack_concat`-ed} (None otherwise); its
      shrinks are `amx.PackedKernel`s and a group runs as one
      `amx.lora_group` call.
    group_widths: per group, its targets' d_out (static; packed view).
  """

  shrink: dict[str, jax.Array]
  expand: dict[str, jax.Array | None]
  scale: jax.Array
  groups: tuple[tuple[str, ...], ...] = flax.struct.field(pytree_node=False)
  packed_expand: dict | None = None
  group_widths: tuple[tuple[int, ...], ...] = flax.struct.field(
      pytree_node=False, default=())

  @property
  def targets(self) -> tuple[str, ...]:
    return tuple(self.expand)

  def adapts(self, target: str) -> bool:
    return target in self.expand

  def deltas(self, x_btd, names, adapter_idx_b) -> list:
    """LoRA deltas [B, T, d_out] in x's dtype for `names` (all read x), or
    None for a name the view does not adapt; one shrink GEMM per group.

    Matches `lora_op.gather` step for step: shrink in f32, scaled, cast to
    x's dtype, expand in f32, cast to x's dtype.
    """
    num_adapters = self.scale.shape[0]
    out = {}
    for gi, group in enumerate(self.groups):
      if not any(n in names for n in group):
        continue
      w = self.shrink[_key(group)]
      width = w.shape[0] // len(group)  # A * R
      rank = width // num_adapters
      if self.packed_expand is not None:  # one native call per group
        widths = self.group_widths[gi]
        y = amx.lora_group(x_btd, w, self.packed_expand[_key(group)], widths,
                           adapter_idx_b[:, None], self.scale, rank)
        offsets = np.cumsum((0,) + widths)
        for i, name in enumerate(group):
          out[name] = y[..., offsets[i]:offsets[i + 1]]
        continue
      h_btk = _matmul(x_btd, w)
      own_bk, scale_bk = _row_mask(adapter_idx_b, self.scale, rank)
      for i, name in enumerate(group):
        if name not in names:
          continue
        h_i = h_btk[..., i * width:(i + 1) * width] * scale_bk[:, None, :]
        h_i = jnp.where(own_bk[:, None, :], h_i, 0.0)
        y = _matmul(h_i.astype(x_btd.dtype), self.expand[name])
        out[name] = y.astype(x_btd.dtype)
    return [out.get(n) for n in names]


def _matmul(x_btk, w):
  """x @ w.T in f32 for an [out, in] array."""
  return jnp.einsum("btk,ok->bto", x_btk, w.astype(x_btk.dtype),
                    preferred_element_type=jnp.float32)


def _row_mask(adapter_idx_b, scale_a, rank: int):
  """([B, A*R] bool: column belongs to the row's slot, [B, A*R] f32 scale).

  Slot 0 (base) and an index outside [1, A] select no column (a zero
  delta), unlike a clamping gather, which would read another tenant's slot.
  """
  num_adapters = scale_a.shape[0]
  own_ba = adapter_idx_b[:, None] == 1 + jnp.arange(num_adapters)[None, :]
  own_bk = jnp.repeat(own_ba, rank, axis=1)
  scale_bk = jnp.broadcast_to(jnp.repeat(scale_a, rank)[None, :],
                              own_bk.shape)
  return own_bk, scale_bk


@flax.struct.dataclass
class SlotDenseBank:
  """Per-layer slot-dense factors of one bank version at one rank width.

  Stands in for an `AdapterBank` in `llama.forward` (`layer`, `num_slots`),
  read-only: slots are written to the stacked bank, then a new view made.
  """

  layers: tuple[SlotDenseLayer, ...]
  scale: jax.Array
  rank: jax.Array

  @property
  def num_slots(self) -> int:
    return int(self.scale.shape[0])

  @property
  def width(self) -> int:
    """The view's rank width R."""
    first = self.layers[0]
    w = first.shrink[_key(first.groups[0])]
    return w.shape[0] // (len(first.groups[0]) * (self.num_slots - 1))

  def layer(self, layer_idx: int, rank: int | None = None) -> SlotDenseLayer:
    """Layer `layer_idx` (a Python int: the view is unrolled per layer).

    `rank` must be None or the view's own width (the width is chosen when
    the view is made, `SlotDenseCache.get`).
    """
    if rank is not None and rank != self.width:
      raise ValueError(
          f"this slot-dense view has rank width {self.width}, not {rank}; "
          "make the view at the width the step runs (SlotDenseCache.get)")
    return self.layers[layer_idx]


def groups_for(targets, *, qkv: bool, gate_up: bool
               ) -> tuple[tuple[str, ...], ...]:
  """Target groups of the view: q/k/v (gate/up) are one group when the
  model runs them as one fused projection (`mintjax.model.fused`), else
  every target is its own group (its own input, its own shrink)."""
  present = [t for t in DENSE_TARGETS if t in set(targets)]
  groups = []
  for fused, names in ((qkv, ("q", "k", "v")), (gate_up, ("gate", "up"))):
    if fused:
      group = tuple(t for t in names if t in present)
      if group:
        groups.append(group)
  grouped = {t for g in groups for t in g}
  return tuple(groups) + tuple((t,) for t in present if t not in grouped)


def supports(bank_targets) -> bool:
  """Whether a bank's targets all have a slot-dense layout."""
  return set(bank_targets) <= set(DENSE_TARGETS)


@functools.partial(jax.jit,
                   static_argnames=("rank", "groups", "dtype", "packed"))
def slot_dense_view(bank: AdapterBank, *, rank: int,
                    groups: tuple[tuple[str, ...], ...],
                    dtype: str, packed: bool = False) -> SlotDenseBank:
  """The view of `bank` at rank width `rank` (<= the bank's max_rank; exact
  for slots whose true rank is <= rank), factors cast to `dtype`; packed
  for `cpu_kernels.amx.lora_group` when `packed` (bf16)."""
  dt = jnp.dtype(dtype)
  store = amx.pack if packed else (lambda w: w)
  widths = tuple(tuple(bank.lora_b[t].shape[-1] for t in g) for g in groups)
  a0 = next(iter(bank.lora_a.values()))
  num_adapters, num_layers = a0.shape[0] - 1, a0.shape[1]
  layers = []
  for l in range(num_layers):
    shrink, expand, packed_expand = {}, {}, {}
    for group in groups:
      rows = []
      for t in group:
        a_sdr = bank.lora_a[t][1:, l, :, :rank]
        rows.append(a_sdr.transpose(0, 2, 1).reshape(-1, a_sdr.shape[1]))
        b_sro = bank.lora_b[t][1:, l, :rank, :]
        expand[t] = b_sro.reshape(num_adapters * rank, -1).T.astype(dt)
      shrink[_key(group)] = store(jnp.concatenate(rows, axis=0).astype(dt))
      if packed:
        packed_expand[_key(group)] = amx.pack_concat([expand[t] for t in group])
    if packed:
      layers.append(SlotDenseLayer(shrink, dict.fromkeys(expand), bank.scale[1:],
                                   groups, packed_expand, widths))
    else:
      layers.append(SlotDenseLayer(shrink, expand, bank.scale[1:], groups))
  return SlotDenseBank(tuple(layers), bank.scale, bank.rank)


class SlotDenseCache:
  """The slot-dense views of the current bank, one per rank width.

  `get(bank, rank)` rebuilds when `bank` is not the bank the cached views
  were made from (slot writes return a new bank object), so a view never
  outlives the adapters it was made of.
  """

  def __init__(self, groups: tuple[tuple[str, ...], ...], dtype: str,
               packed: bool = False):
    self.groups = groups
    self.dtype = dtype
    self.packed = packed
    self._bank = None
    self._views: dict[int, SlotDenseBank] = {}

  def get(self, bank: AdapterBank, rank: int) -> SlotDenseBank:
    if bank is not self._bank:
      self._bank, self._views = bank, {}
    if rank not in self._views:
      self._views[rank] = slot_dense_view(bank, rank=rank, groups=self.groups,
                                          dtype=self.dtype, packed=self.packed)
    return self._views[rank]
