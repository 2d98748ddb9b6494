"""The multi-tenant training loss: next-token cross-entropy, mean per user.

Owns `token_cross_entropy`, `per_slot_loss` (token losses reduced to one mean
per adapter slot), `multi_tenant_loss` (their sum over the slots present) and
`completion_window` (the static per-row window of completion positions, so
the LM head is applied only where a loss is taken).

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


def completion_window(hidden_btd, targets_bt, loss_mask_bt, width: int):
  """Cuts each row down to a `width`-long window starting at its completion.

  Personal-data examples are a prompt followed by a short completion, and the
  loss is taken only on completion targets; the 49152-wide LM head of a
  model like SmolLM2 is ~20% of a step's FLOPs when applied at every
  position. With a static window the head runs on B x width positions
  instead of B x T, and the program shape does not depend on the data.

  Args:
    hidden_btd: [B, T, D] final normed hidden states.
    targets_bt: [B, T] int32 next-token targets.
    loss_mask_bt: [B, T] 1.0 on trained targets.
    width: W, the static window length (W <= T).

  Returns:
    (hidden_bwd [B, W, D], targets_bw [B, W], mask_bw [B, W], dropped_b [B]
    float32: mask weight outside the window, which must be 0; the train loop
    checks every example fits before any step and the step reports it).
  """
  t = hidden_btd.shape[1]
  if not 0 < width <= t:
    raise ValueError(f"completion window {width} must be in [1, T={t}]")
  # The first trained target of each row (0 for rows with no mask).
  start_b = jnp.argmax(loss_mask_bt > 0, axis=1)
  # Keep the window inside the row: a window that would run past T starts
  # earlier instead (the extra leading positions carry mask 0 or are kept).
  start_b = jnp.minimum(start_b, t - width)
  idx_bw = start_b[:, None] + jnp.arange(width)[None, :]
  hidden_bwd = jnp.take_along_axis(hidden_btd, idx_bw[..., None], axis=1)
  targets_bw = jnp.take_along_axis(targets_bt, idx_bw, axis=1)
  mask_bw = jnp.take_along_axis(loss_mask_bt, idx_bw, axis=1)
  dropped_b = jnp.sum(loss_mask_bt, axis=1) - jnp.sum(mask_bw, axis=1)
  return hidden_bwd, targets_bw, mask_bw, dropped_b


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
