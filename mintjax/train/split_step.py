"""Forward-backward and optimizer step as two compiled programs (Tinker style).

Owns `TokenBatch` (the arrays one forward-backward consumes: per-token
targets, weights, advantages and sampler log-probabilities, a loss code and a
'train' flag per row), `OptimParams` (per-slot Adam hyper-parameters as [S]
arrays) and the factories `make_forward_backward`, `make_optim_step` and
`make_token_logprobs`.

`mintjax.train.step` fuses loss, gradient and AdamW into one program, which
suits a training loop the library drives. A Tinker client drives its own loop
instead: `forward_backward` accumulates gradients (any number of times), and
`optim_step` applies them with Adam parameters the client chooses per call.
So the gradient lives between the two calls as a device buffer shaped like the
trainable bank ([S, ...]), and both programs serve many tenants at once: rows
of a forward-backward may belong to any slot, and an optimizer step updates
every slot in its `active_s` mask with that slot's own learning rate, betas,
eps, weight decay and clip norm.

Isolation (the DESIGN's invariant 4) holds per slot: a slot with no rows gets
an exactly zero gradient from the gather-LoRA backward and its accumulator is
selected back unchanged; a slot not in `active_s` keeps its weights, moments,
counter and accumulator bit for bit. Per-slot target masks let a tenant train
attention or MLP projections only (Tinker's `train_attn` / `train_mlp`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from mintjax.adapters.bank import AdapterBank
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.train import losses
from mintjax.train import optimizer as opt_lib


@flax.struct.dataclass
class TokenBatch:
  """B rows of length T for one forward(-backward).

  Attributes:
    tokens: [B, T] int32 input ids.
    targets: [B, T] int32 next-token targets.
    positions: [B, T] int32 positions.
    segment_ids: [B, T] int32, 1 on real tokens, 0 on padding.
    adapter_idx: [B] int32 slot of each row (0 = base / padding).
    loss_kind: [B] int32 loss code (`losses.loss_code`).
    train: [B] float32, 1.0 where the row's loss is differentiated (0 for
      forward-only rows and padding).
    weights: [B, T] float32 cross-entropy weights.
    advantages: [B, T] float32 advantages.
    sampling_logprobs: [B, T] float32 sampler log-probabilities.
    clip_low, clip_high: [B, T] float32 PPO ratio bounds.
  """

  tokens: jax.Array
  targets: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  adapter_idx: jax.Array
  loss_kind: jax.Array
  train: jax.Array
  weights: jax.Array
  advantages: jax.Array
  sampling_logprobs: jax.Array
  clip_low: jax.Array
  clip_high: jax.Array


@flax.struct.dataclass
class OptimParams:
  """Adam hyper-parameters of every slot, each a [S] float32 array."""

  learning_rate: jax.Array
  beta1: jax.Array
  beta2: jax.Array
  eps: jax.Array
  weight_decay: jax.Array
  grad_clip_norm: jax.Array


def zero_grads(bank: AdapterBank) -> dict:
  """A zero gradient accumulator shaped like the trainable bank."""
  return jax.tree.map(jnp.zeros_like, opt_lib.trainable_params(bank))


def _logprobs(base_params, bank, batch: TokenBatch, *, config, lora_impl):
  logits_btv, _ = llama.forward(
      base_params, bank, batch.adapter_idx, batch.tokens, batch.positions,
      config=config, segment_ids_bt=batch.segment_ids, lora_impl=lora_impl)
  return losses.target_logprobs(logits_btv, batch.targets)


def forward_backward(base_params, bank: AdapterBank, grads_acc: dict,
                     batch: TokenBatch, *, config: ModelConfig,
                     lora_impl: str = "auto"):
  """Adds the batch's gradient to `grads_acc` (uncompiled).

  Returns:
    (grads_acc + d(sum of trained rows' losses)/d(trainable bank),
     logprobs_bt [B, T], loss_bt [B, T]) with padding positions zero.
  """
  base_params = jax.lax.stop_gradient(base_params)
  real_bt = (batch.segment_ids > 0).astype(jnp.float32)

  def objective(trainable):
    logp_bt = _logprobs(base_params, bank.replace(**trainable), batch,
                        config=config, lora_impl=lora_impl)
    loss_bt = losses.token_losses(
        logp_bt, kind_b=batch.loss_kind, weights_bt=batch.weights,
        advantages_bt=batch.advantages,
        sampling_logprobs_bt=batch.sampling_logprobs,
        clip_low_bt=batch.clip_low, clip_high_bt=batch.clip_high) * real_bt
    return jnp.sum(loss_bt * batch.train[:, None]), (logp_bt * real_bt,
                                                     loss_bt)

  trainable = opt_lib.trainable_params(bank)
  (_, (logp_bt, loss_bt)), grads = jax.value_and_grad(
      objective, has_aux=True)(trainable)
  num_slots = bank.scale.shape[0]
  present_s = jax.ops.segment_sum(batch.train, batch.adapter_idx,
                                  num_segments=num_slots) > 0
  present_s = present_s & (jnp.arange(num_slots) != 0)
  add = lambda acc, g: jnp.where(opt_lib._bcast(present_s, acc), acc + g, acc)  # pylint: disable=protected-access
  return jax.tree.map(add, grads_acc, grads), logp_bt, loss_bt


def optim_step(bank: AdapterBank, opt_state: opt_lib.SlotOptState,
               grads_acc: dict, hp: OptimParams, active_s, target_mask: dict):
  """One Adam(W) step on the active slots with per-slot hyper-parameters.

  Args:
    bank: the trainer's LoRA bank [S, ...].
    opt_state: per-slot moments and counters.
    grads_acc: accumulated gradients (tree of `trainable_params(bank)`).
    hp: per-slot Adam parameters.
    active_s: [S] bool, slots that step now (slot 0 never does).
    target_mask: target -> [S] float32, 1.0 where the slot trains that
      projection.

  Returns:
    (bank, opt_state, grads_acc with the active slots zeroed, metrics
    {'grad_norm': [S]} (before clipping)).
  """
  num_slots = active_s.shape[0]
  active_s = active_s & (jnp.arange(num_slots) != 0)
  params = opt_lib.trainable_params(bank)
  mask = opt_lib.rank_mask(bank)
  mask = {k: {t: m * opt_lib._bcast(target_mask[t], m).astype(m.dtype)  # pylint: disable=protected-access
              for t, m in tree.items()} for k, tree in mask.items()}
  grads = jax.tree.map(lambda g, m: g * m.astype(g.dtype), grads_acc, mask)
  norm_s = opt_lib._grad_norms(grads)  # pylint: disable=protected-access
  clip = hp.grad_clip_norm
  factor_s = jnp.where(clip > 0, jnp.minimum(1.0, clip / (norm_s + 1e-6)),
                       1.0)
  count_s = jnp.where(active_s, opt_state.count + 1, opt_state.count)
  t = count_s.astype(jnp.float32)
  corr1_s = jnp.where(active_s, 1.0 - jnp.power(hp.beta1, t), 1.0)
  corr2_s = jnp.where(active_s, 1.0 - jnp.power(hp.beta2, t), 1.0)
  b = opt_lib._bcast  # pylint: disable=protected-access

  def update(p, g, m, v, acc):
    act = b(active_s, p)
    g32 = g.astype(jnp.float32) * b(factor_s, g)
    b1, b2 = b(hp.beta1, p), b(hp.beta2, p)
    m_new = b1 * m + (1.0 - b1) * g32
    v_new = b2 * v + (1.0 - b2) * jnp.square(g32)
    step = (m_new / b(corr1_s, p)) / (jnp.sqrt(v_new / b(corr2_s, p)) +
                                      b(hp.eps, p))
    p32 = p.astype(jnp.float32)
    step = step + b(hp.weight_decay, p) * p32
    p_new = (p32 - b(hp.learning_rate, p) * step).astype(p.dtype)
    return (jnp.where(act, p_new, p), jnp.where(act, m_new, m),
            jnp.where(act, v_new, v), jnp.where(act, jnp.zeros_like(acc), acc))

  out = jax.tree.map(update, params, grads, opt_state.mu, opt_state.nu,
                     grads_acc)
  is_quad = lambda x: isinstance(x, tuple) and len(x) == 4
  pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=is_quad)
  # Masked projections (an untrained target, padded rank) keep their exact
  # zeros: their (masked) gradient is zero, so Adam's step is 0 / (0 + eps)
  # = 0 and only weight decay could move them, which multiplies zero.
  new_state = opt_lib.SlotOptState(mu=pick(1), nu=pick(2), count=count_s)
  return (bank.replace(**pick(0)), new_state, pick(3),
          {"grad_norm": norm_s})


@dataclasses.dataclass(frozen=True)
class SplitSteps:
  """The compiled programs of the split (Tinker-style) training path.

  Attributes:
    forward_backward: `(base, bank, grads_acc, TokenBatch) -> (grads_acc,
      logprobs_bt, loss_bt)`; `grads_acc` is donated.
    optim_step: `(bank, opt_state, grads_acc, OptimParams, active_s,
      target_mask) -> (bank, opt_state, grads_acc, metrics)`; the bank,
      optimizer state and accumulator are donated.
    token_logprobs: `(base, bank, TokenBatch) -> logprobs_bt` (forward only,
      for forward-only rows and prompt scoring).
  """

  forward_backward: Callable
  optim_step: Callable
  token_logprobs: Callable


def make_split_steps(config: ModelConfig, lora_impl: str = "auto"
                     ) -> SplitSteps:
  """Builds the three programs once; each (B, T) bucket compiles once."""
  fb = jax.jit(lambda base, bank, acc, batch: forward_backward(
      base, bank, acc, batch, config=config, lora_impl=lora_impl),
               donate_argnums=(2,))
  opt = jax.jit(optim_step, donate_argnums=(0, 1, 2))
  lp = jax.jit(lambda base, bank, batch: _logprobs(
      base, bank, batch, config=config, lora_impl=lora_impl) * (
          batch.segment_ids > 0))
  return SplitSteps(forward_backward=fb, optim_step=opt, token_logprobs=lp)
