"""The multi-tenant training loss: next-token cross-entropy, mean per user.

Owns `token_cross_entropy`, `per_slot_loss` (token losses reduced to one mean
per adapter slot) and `multi_tenant_loss` (their sum over the slots present).

Why the sum over slots of per-slot means: each slot's loss is the weighted
mean over its own completion tokens, so a user with long examples does not
dominate others in the batch; summing (not averaging) the per-slot means keeps
a slot's gradient independent of how many other users share the batch, which
is what makes a user's trajectory independent of batch composition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_btv, targets_bt):
  """Per-token next-token cross-entropy in float32.

  Args:
    logits_btv: [B, T, V] logits.
    targets_bt: [B, T] int32 target ids.

  Returns:
    [B, T] float32 losses.
  """
  logits = logits_btv.astype(jnp.float32)
  lse_bt = jax.nn.logsumexp(logits, axis=-1)
  picked_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return lse_bt - picked_bt


def per_slot_loss(token_loss_bt, loss_mask_bt, weight_b, adapter_idx_b,
                  num_slots: int):
  """Weighted mean token loss of each slot.

  Args:
    token_loss_bt: [B, T] per-token losses.
    loss_mask_bt: [B, T] 1.0 on completion tokens (the trained targets).
    weight_b: [B] per-example weights (0 for padding rows).
    adapter_idx_b: [B] int32 slot of each row.
    num_slots: S.

  Returns:
    (loss_s [S] float32, 0 where a slot has no tokens; tokens_s [S] float32
    weighted token count; present_s [S] bool).
  """
  w_bt = loss_mask_bt.astype(jnp.float32) * weight_b[:, None].astype(
      jnp.float32)
  sum_b = jnp.sum(token_loss_bt * w_bt, axis=1)
  tok_b = jnp.sum(w_bt, axis=1)
  sum_s = jax.ops.segment_sum(sum_b, adapter_idx_b, num_segments=num_slots)
  tok_s = jax.ops.segment_sum(tok_b, adapter_idx_b, num_segments=num_slots)
  present_s = tok_s > 0
  loss_s = jnp.where(present_s, sum_s / jnp.where(present_s, tok_s, 1.0), 0.0)
  return loss_s, tok_s, present_s


def multi_tenant_loss(logits_btv, targets_bt, loss_mask_bt, weight_b,
                      adapter_idx_b, num_slots: int):
  """Sum over present slots of each slot's mean completion-token loss.

  Returns:
    (scalar loss, aux dict with 'loss_s', 'tokens_s', 'present_s').
  """
  token_loss_bt = token_cross_entropy(logits_btv, targets_bt)
  loss_s, tok_s, present_s = per_slot_loss(
      token_loss_bt, loss_mask_bt, weight_b, adapter_idx_b, num_slots)
  return jnp.sum(loss_s), {"loss_s": loss_s, "tokens_s": tok_s,
                           "present_s": present_s}
