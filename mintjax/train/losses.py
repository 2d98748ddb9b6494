"""Per-token policy-gradient losses, as the Tinker API defines them.

Owns `LOSS_KINDS` (the loss names, in the order of their integer codes),
`target_logprobs` (log p(target) per token) and `token_losses`, which turns
per-token log-probabilities into per-token losses for a batch whose rows may
each use a different loss:

  cross_entropy        loss_t = -w_t * logp_t
  importance_sampling  loss_t = -exp(logp_t - q_t) * A_t
  ppo                  loss_t = -min(r_t * A_t, clip(r_t, lo_t, hi_t) * A_t),
                       r_t = exp(logp_t - q_t)

where w are per-token weights, A per-token advantages and q the sampler's
log-probabilities of the same tokens. These are sums over tokens, not means
(a client that wants a mean scales its weights or advantages): that is the
contract the Tinker SDK documents and what `forward_backward_custom` relies
on (it sends `weights = -dC/dlogp` and expects the gradient of
`sum(-w * logp)`).

Why a row code instead of one program per loss: clients of one batching
window use different losses (one user does SFT while another runs RL), and
every row of the compiled step computes all three cheap elementwise forms and
selects its own; the costly part (forward and backward through the model) is
shared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_KINDS = ("cross_entropy", "importance_sampling", "ppo")
PPO_CLIP_DEFAULT = (0.8, 1.2)  # (clip_low_threshold, clip_high_threshold)


def loss_code(name: str) -> int:
  """The integer code of a loss name (its index in `LOSS_KINDS`)."""
  if name not in LOSS_KINDS:
    raise ValueError(f"loss_fn {name!r} is not supported; choose one of "
                     f"{', '.join(LOSS_KINDS)}")
  return LOSS_KINDS.index(name)


def target_logprobs(logits_btv, targets_bt):
  """log p(target) per token in float32.

  Args:
    logits_btv: [B, T, V] logits.
    targets_bt: [B, T] int32 target ids.

  Returns:
    [B, T] float32 log-probabilities.
  """
  logits = logits_btv.astype(jnp.float32)
  lse_bt = jax.nn.logsumexp(logits, axis=-1)
  picked_bt = jnp.take_along_axis(logits, targets_bt[..., None],
                                  axis=-1)[..., 0]
  return picked_bt - lse_bt


def token_losses(logp_bt, *, kind_b, weights_bt, advantages_bt,
                 sampling_logprobs_bt, clip_low_bt, clip_high_bt):
  """Per-token losses of rows that each pick their loss by `kind_b`.

  Args:
    logp_bt: [B, T] log-probabilities of the targets under the trained model.
    kind_b: [B] int32 loss code per row (`loss_code`).
    weights_bt: [B, T] cross-entropy weights (0 on untrained tokens).
    advantages_bt: [B, T] advantages (0 on untrained tokens).
    sampling_logprobs_bt: [B, T] sampler log-probabilities q.
    clip_low_bt, clip_high_bt: [B, T] PPO ratio bounds.

  Returns:
    [B, T] float32 losses (sum them for the objective).
  """
  ce_bt = -weights_bt * logp_bt
  # The ratio is computed from the difference so that it is exactly 1 when
  # the sampler and the trainer agree, and never overflows for one token.
  ratio_bt = jnp.exp(jnp.clip(logp_bt - sampling_logprobs_bt, -30.0, 30.0))
  is_bt = -ratio_bt * advantages_bt
  clipped_bt = jnp.clip(ratio_bt, clip_low_bt, clip_high_bt)
  ppo_bt = -jnp.minimum(ratio_bt * advantages_bt, clipped_bt * advantages_bt)
  kind = kind_b[:, None]
  return jnp.where(kind == 0, ce_bt, jnp.where(kind == 1, is_bt, ppo_bt))
