"""Per-slot AdamW: one optimizer per adapter slot, stacked along the slot axis.

Owns `OptimizerConfig`, `SlotOptState` (Adam moments shaped like the bank's
LoRA factors plus a per-slot step counter), the per-slot learning-rate
schedule, per-slot gradient clipping and `apply_updates`. Which part of a
bank is trained, and its per-slot rank mask, is the adapter family's answer
(`mintjax.adapters.family`): the A/B factors of a LoRA `AdapterBank`, the
scaling vectors of a VeRA bank (whose frozen basis gets no optimizer state),
or whatever a new family declares.

Why not optax: an optax transform keeps one step count and one schedule for
the whole tree, and its momentum and weight decay would move every slot on
every step. Here each slot has its own counter (so its bias correction and
schedule follow its own training history) and a slot with no examples in the
batch is selected back unchanged with `jnp.where`, which keeps its weights and
moments bit-identical. Slot 0, the null adapter, is never active.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from mintjax.adapters.bank import AdapterBank
from mintjax.adapters.family import TrainerBank, family_of_bank
from mintjax.adapters.spec import BankSpec

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW hyper-parameters shared by every slot (each runs its own copy).

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up length, counted in the slot's own steps.
    decay_steps: length of the decay after warm-up ('cosine', 'linear').
    schedule: 'constant', 'cosine' or 'linear'.
    min_lr_ratio: floor of the decayed learning rate, as a fraction of peak.
    b1, b2, eps: Adam constants.
    weight_decay: decoupled weight decay (AdamW), applied to active slots only.
    clip_norm: per-slot global-norm gradient clipping; 0 disables it.
  """

  learning_rate: float = 1e-3
  warmup_steps: int = 0
  decay_steps: int = 0
  schedule: str = "constant"
  min_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float = 0.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(
          f"optimizer schedule must be one of {SCHEDULES}, got "
          f"{self.schedule!r}")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(
          f"learning_rate must be a positive finite number, got "
          f"{self.learning_rate}")
    if self.schedule != "constant" and self.decay_steps <= 0:
      raise ValueError(
          f"schedule {self.schedule!r} needs decay_steps > 0, got "
          f"{self.decay_steps}; set decay_steps or use schedule='constant'")
    if self.clip_norm < 0 or self.weight_decay < 0:
      raise ValueError("clip_norm and weight_decay must be >= 0")


@flax.struct.dataclass
class SlotOptState:
  """Optimizer state of every slot.

  Attributes:
    mu: first moments, shaped like `trainable_params(bank)`: LoRA
      {'lora_a': {t: [S, L, d_in, R]}, 'lora_b': {t: [S, L, R, d_out]}},
      VeRA {'lambda_d': {t: [S, L, R]}, 'lambda_b': {t: [S, L, d_out]}}.
    nu: second moments, same tree as `mu`.
    count: [S] int32, optimizer steps taken by each slot.
  """

  mu: dict
  nu: dict
  count: jax.Array


def trainable_params(bank: TrainerBank) -> dict:
  """The differentiated part of a trainer's bank, keyed by its field names
  ({'lora_a', 'lora_b'} for LoRA, {'lambda_d', 'lambda_b'} for VeRA), so
  `bank.replace(**trainable)` puts updated values back for any family."""
  return family_of_bank(bank).trainable(bank)


def forward_bank(bank: TrainerBank, trainable: dict) -> AdapterBank:
  """The LoRA bank the model runs with `trainable` substituted (jit-able).

  Families with derived factors (VeRA: vectors times a frozen basis)
  materialise here, inside the differentiated function, so gradients reach
  the trained leaves only.
  """
  bank = bank.replace(**trainable)
  return family_of_bank(bank).to_lora_bank(bank)


def train_bank_shapes(config, spec: BankSpec):
  """Shapes of the trainer's bank for `spec` (its family's bank type)."""
  return spec.family.bank_shapes(config, spec)


def train_bank_logical_axes(spec: BankSpec):
  """Logical axes of the trainer's bank for `spec` (same tree as shapes)."""
  return spec.family.bank_logical_axes(spec)


def init_opt_state(bank: TrainerBank) -> SlotOptState:
  """Zero moments and counters for every slot of `bank`."""
  zeros = jax.tree.map(jnp.zeros_like, trainable_params(bank))
  return SlotOptState(mu=zeros, nu=jax.tree.map(jnp.zeros_like, zeros),
                      count=jnp.zeros(bank.scale.shape, jnp.int32))


def opt_logical_axes(spec: BankSpec) -> SlotOptState:
  """Logical axis names of the optimizer state (moments follow the bank)."""
  moments = trainable_params(train_bank_logical_axes(spec))
  return SlotOptState(mu=moments, nu=moments, count=("slot",))


def reset_slots(state: SlotOptState, slots_mask_s) -> SlotOptState:
  """Zeroes the moments and counters of the slots where `slots_mask_s` is set.

  Used when a new cohort of users is loaded into the slots.

  Args:
    state: optimizer state.
    slots_mask_s: [S] bool, slots to reset.
  """
  def clear(x):
    m = slots_mask_s.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(m, jnp.zeros_like(x), x)
  return SlotOptState(mu=jax.tree.map(clear, state.mu),
                      nu=jax.tree.map(clear, state.nu),
                      count=jnp.where(slots_mask_s, 0, state.count))


def learning_rate(cfg: OptimizerConfig, count_s):
  """Per-slot learning rate for the step each slot is about to take.

  Args:
    cfg: optimizer config.
    count_s: [S] int32 steps already taken by each slot.

  Returns:
    [S] float32 learning rates.
  """
  step = count_s.astype(jnp.float32)
  peak = jnp.float32(cfg.learning_rate)
  if cfg.warmup_steps > 0:
    warm = peak * jnp.minimum(1.0, (step + 1.0) / cfg.warmup_steps)
  else:
    warm = jnp.full_like(step, peak)
  if cfg.schedule == "constant":
    return warm
  t = jnp.clip((step - cfg.warmup_steps) / cfg.decay_steps, 0.0, 1.0)
  if cfg.schedule == "cosine":
    frac = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  else:
    frac = 1.0 - t
  frac = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * frac
  return jnp.where(step < cfg.warmup_steps, warm, peak * frac)


def _per_slot_sum(tree) -> jax.Array:
  """[S] sum of squares over every leaf's non-slot axes."""
  leaves = jax.tree.leaves(tree)
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32)),
                     axis=tuple(range(1, x.ndim))) for x in leaves)


def _bcast(v_s, x):
  return v_s.reshape((-1,) + (1,) * (x.ndim - 1))


def rank_mask(bank: TrainerBank) -> dict:
  """Per-slot gradient mask (same tree as `trainable_params(bank)`): 1.0 on
  each slot's true-rank part, 0.0 on padding, as the bank's family says.

  Masking gradients with it keeps zero-padded rank exactly zero, so a
  rank-4 adapter in a rank-8 bank stays a rank-4 adapter.
  """
  return family_of_bank(bank).rank_mask(bank)


def apply_updates(cfg: OptimizerConfig, params: dict, grads: dict,
                  state: SlotOptState, active_s, rank_mask_tree=None):
  """One AdamW step on the active slots; inactive slots are returned as is.

  Args:
    cfg: optimizer config.
    params: {'lora_a', 'lora_b'} trees with a leading slot axis S.
    grads: gradients, same tree as `params`.
    state: optimizer state.
    active_s: [S] bool, slots that had examples in this batch (slot 0 is
      forced inactive).
    rank_mask_tree: optional `rank_mask(bank)`, applied to the gradients.

  Returns:
    (new params, new state, metrics) with metrics {'grad_norm': [S],
    'lr': [S]} (the norm before clipping).
  """
  active_s = active_s & (jnp.arange(active_s.shape[0]) != 0)
  if rank_mask_tree is not None:
    grads = jax.tree.map(lambda g, m: g * m.astype(g.dtype), grads,
                         rank_mask_tree)
  grad_norm_s = jnp.sqrt(_per_slot_sum(grads))
  if cfg.clip_norm > 0:
    factor_s = jnp.minimum(1.0, cfg.clip_norm / (grad_norm_s + 1e-6))
    grads = jax.tree.map(lambda g: g * _bcast(factor_s, g).astype(g.dtype),
                         grads)
  count_s = jnp.where(active_s, state.count + 1, state.count)
  lr_s = learning_rate(cfg, state.count)
  t = count_s.astype(jnp.float32)
  corr1_s = 1.0 - jnp.power(jnp.float32(cfg.b1), t)
  corr2_s = 1.0 - jnp.power(jnp.float32(cfg.b2), t)

  def moments(g, mu, nu):
    g32 = g.astype(jnp.float32)
    mu_new = cfg.b1 * mu + (1.0 - cfg.b1) * g32
    nu_new = cfg.b2 * nu + (1.0 - cfg.b2) * jnp.square(g32)
    return mu_new, nu_new

  def update(p, g, mu, nu):
    mu_new, nu_new = moments(g, mu, nu)
    act = _bcast(active_s, p)
    # Inactive slots have corr == 0; the where below discards their values.
    c1 = jnp.where(act, _bcast(corr1_s, p), 1.0)
    c2 = jnp.where(act, _bcast(corr2_s, p), 1.0)
    step = (mu_new / c1) / (jnp.sqrt(nu_new / c2) + cfg.eps)
    p32 = p.astype(jnp.float32)
    if cfg.weight_decay > 0:
      step = step + cfg.weight_decay * p32
    p_new = (p32 - _bcast(lr_s, p) * step).astype(p.dtype)
    return (jnp.where(act, p_new, p), jnp.where(act, mu_new, mu),
            jnp.where(act, nu_new, nu))

  out = jax.tree.map(update, params, grads, state.mu, state.nu)
  is_triple = lambda x: isinstance(x, tuple) and len(x) == 3
  new_params = jax.tree.map(lambda o: o[0], out, is_leaf=is_triple)
  new_mu = jax.tree.map(lambda o: o[1], out, is_leaf=is_triple)
  new_nu = jax.tree.map(lambda o: o[2], out, is_leaf=is_triple)
  metrics = {"grad_norm": grad_norm_s, "lr": lr_s}
  return new_params, SlotOptState(new_mu, new_nu, count_s), metrics
