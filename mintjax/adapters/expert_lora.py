"""Per-tenant LoRA on routed experts: each routed row gathers its (slot, expert) factors.

Owns the expert-axis member of the gather-LoRA op family and the hook that
plugs it into the grouped expert matmuls of `mintjax.model.moe.experts_ffn`
(and its expert-parallel drop-in).

The bank's routed-expert targets (`spec.EXPERT_TARGETS`) carry an expert
axis: one layer's factors are A [S, E, d_in, R] and B [S, E, R, d_out]. A
routed row m (a (token, expert) pair, rows sorted by expert) belongs to
slot s_m (its token's adapter) and expert e_m, and gets

  delta_m = scale[s_m] * (h_m @ A[s_m, e_m]) @ B[s_m, e_m].

Flattening (slot, expert) into one index s_m * E + e_m turns this into the
dense op's problem, a per-row gather over an [S * E]-slot bank, so the same
implementations (`mintjax.adapters.lora_op`: gather, ragged, onehot and the
registered kernels) run it unchanged and stay differentiable; `reference`
is the independent oracle (one-hot over slots and experts, no gather).

Fused gate|up. `experts_gate_up` holds one LoRA on the concatenated
[d, 2 * Fe] gate|up weights (as transformers 5 stores `gate_up_proj` and
PEFT's `target_parameters` adapts it): gate reads B's first Fe columns and
up the rest, with the shared A.

Shapes: M routed rows, S slots, E experts, R rank, d_in / d_out the
expert matmul's widths, T tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mintjax.adapters import lora_op
from mintjax.adapters.spec import EXPERT_TARGETS

_HIGHEST = jax.lax.Precision.HIGHEST
IMPLS = ("reference", "gather", "ragged", "onehot")
_TARGET_OF = {"gate": "experts_gate_up", "up": "experts_gate_up",
              "down": "experts_down"}


def reference(h_md, a_sedr, b_sero, scale_s, slot_m, expert_m):
  """The oracle: one-hot selection over slots and experts ([M, d_out]).

  O(M * S * E * d * R): for tests only.
  """
  s, e = a_sedr.shape[:2]
  sel_mse = (jax.nn.one_hot(slot_m, s, dtype=jnp.float32)[:, :, None] *
             jax.nn.one_hot(expert_m, e, dtype=jnp.float32)[:, None, :])
  a_mdr = jnp.einsum("mse,sedr->mdr", sel_mse, a_sedr.astype(jnp.float32),
                     precision=_HIGHEST)
  b_mro = jnp.einsum("mse,sero->mro", sel_mse, b_sero.astype(jnp.float32),
                     precision=_HIGHEST)
  h_mr = jnp.einsum("md,mdr->mr", h_md.astype(jnp.float32), a_mdr,
                    precision=_HIGHEST) * scale_s[slot_m][:, None]
  y_mo = jnp.einsum("mr,mro->mo", h_mr, b_mro, precision=_HIGHEST)
  return y_mo.astype(h_md.dtype)


def expert_lora_delta(h_md, a_sedr, b_sero, scale_s, slot_m, expert_m, *,
                      impl: str = "gather", rank_s=None):
  """LoRA deltas of routed rows, each with its (slot, expert) factors.

  Args:
    h_md: [M, d_in] routed rows (any order).
    a_sedr: [S, E, d_in, R] one layer's A factors.
    b_sero: [S, E, R, d_out] one layer's B factors.
    scale_s: [S] LoRA scales.
    slot_m: [M] int32 bank slot of each row (0 = the null adapter).
    expert_m: [M] int32 expert of each row.
    impl: 'reference' (`reference`), or a `lora_op` implementation run on
      the flattened [S * E] bank: 'gather' (per-row gather, the default:
      reads only the factors the rows use), 'ragged', 'onehot' (cost grows
      with S * E) or a registered kernel.
    rank_s: optional [S] true ranks (kernels skip padded rank).

  Returns:
    [M, d_out] in h's dtype.
  """
  if impl == "reference":
    return reference(h_md, a_sedr, b_sero, scale_s, slot_m, expert_m)
  s, e, d_in, r = a_sedr.shape
  flat_m = slot_m.astype(jnp.int32) * e + expert_m.astype(jnp.int32)
  a_kdr = a_sedr.reshape(s * e, d_in, r)
  b_kro = b_sero.reshape(s * e, r, -1)
  scale_k = jnp.repeat(scale_s, e)
  rank_k = None if rank_s is None else jnp.repeat(rank_s, e)
  # Every row is its own one-token example of the dense op.
  y = lora_op.lora_delta(h_md[:, None, :], a_kdr, b_kro, scale_k, flat_m,
                         impl, rank_s=rank_k)
  return y[:, 0, :]


def has_expert_targets(layer_bank) -> bool:
  """Whether a layer's bank adapts any routed-expert matmul."""
  return layer_bank is not None and any(
      t in layer_bank.lora_a for t in EXPERT_TARGETS)


def expert_hook(layer_bank, slot_t, *, impl: str = "gather"):
  """The `moe.ExpertAdapter` of one layer's bank, or None without expert
  targets.

  Args:
    layer_bank: `bank.LayerBank` (routed-expert factors [S, E, d, R]).
    slot_t: [T] int32 adapter slot of every token of the flattened batch
      (the rows `moe.experts_ffn`'s `token_m` indexes). Under expert
      parallelism the gathered slots arrive as the hook's `rows=` instead
      (`expert_parallel.experts_ffn_sharded(adapter_rows=slot_t)`).
    impl: `expert_lora_delta` implementation.
  """
  if not has_expert_targets(layer_bank):
    return None

  def hook(name, h_md, *, expert_m, token_m, group_sizes_e, rows=None):
    del group_sizes_e  # the gather reads each row's factors directly
    target = _TARGET_OF[name]
    if target not in layer_bank.lora_a:
      return None
    a, b = layer_bank.lora_a[target], layer_bank.lora_b[target]
    if target == "experts_gate_up":  # gate|up columns, shared A
      f = b.shape[-1] // 2
      b = b[..., :f] if name == "gate" else b[..., f:]
    slot_m = jnp.take(slot_t if rows is None else rows, token_m, axis=0)
    return expert_lora_delta(h_md, a, b, layer_bank.scale, slot_m, expert_m,
                             impl=impl, rank_s=layer_bank.rank)
  return hook
