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

Two paths compute the same update, bit for bit (`OptimizerConfig.slot_sweep`):
  'all'      the AdamW math runs over every slot [S, ...] and absent slots
             are selected back with `jnp.where`: a memory-bound sweep of the
             whole bank, its gradient and both moments every step.
  'present'  only the slots active in this batch are touched: at most
             P = min(S - 1, batch rows) of them (static), found with a
             static-size `jnp.nonzero(active_s, size=P, fill_value=S)`. Their
             params, gradients, moments and counters are gathered to
             [P, ...], run through the same per-slot math, and scattered
             back with `mode="drop"`, so the padding entries (index S) and
             slot 0 (never active) are never written and absent slots are
             not read or written at all.
  'auto'     (default) 'present' when P < S / 2, else 'all'.
The gradient itself still covers the whole bank (the backward of the
gather-LoRA op produces [S, ...]), and both paths take the per-slot
gradient norms (for clipping and the 'grad_norm' metric) over that whole
gradient: one read of it, against the 'all' path's reads of params,
gradient and both moments plus three writes of the whole bank. XLA sums a reduction in an
order that depends on its output size, so norms of a gathered [P, ...]
gradient would differ from the all-slot ones in the last bit.
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
SLOT_SWEEPS = ("auto", "all", "present")


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
    slot_sweep: which slots the update runs over: 'all', 'present' (only
      the slots in the batch, gathered) or 'auto' (see the module
      docstring). The result is the same bit for bit; only the cost differs.
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
  slot_sweep: str = "auto"

  def __post_init__(self):
    if self.slot_sweep not in SLOT_SWEEPS:
      raise ValueError(
          f"optimizer slot_sweep must be one of {SLOT_SWEEPS}, got "
          f"{self.slot_sweep!r}")
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


def _grad_norms(grads: dict, mask=None) -> jax.Array:
  """[S] global norm of each slot's gradient times its rank mask (over
  every leaf's non-slot axes).

  Both optimizer paths call this on the whole [S, ...] gradient, not on a
  gathered [P, ...] one: XLA:CPU's reduction emitter sums in an order that
  depends on the number of output rows (measured: 1-ulp differences between
  [24, 2, 4, 32] and [8, 2, 4, 32] for the same rows), which would break
  the bit-identity of the two paths. The barriers give both programs the
  same reduction fusions over materialised inputs; the mask multiply fuses
  into them, so this is one read of the gradient.
  """
  if mask is None:
    mask = jax.tree.map(lambda g: jnp.ones((), g.dtype), grads)
  leaves, masks = jax.lax.optimization_barrier(
      (jax.tree.leaves(grads), jax.tree.leaves(mask)))
  sums = [jnp.sum(jnp.square((g * m.astype(g.dtype)).astype(jnp.float32)),
                  axis=tuple(range(1, g.ndim))) for g, m in zip(leaves, masks)]
  return jnp.sqrt(sum(jax.lax.optimization_barrier(sums)))


def _bcast(v_s, x):
  return v_s.reshape((-1,) + (1,) * (x.ndim - 1))


def rank_mask(bank: TrainerBank) -> dict:
  """Per-slot gradient mask (same tree as `trainable_params(bank)`): 1.0 on
  each slot's true-rank part, 0.0 on padding, as the bank's family says.

  Masking gradients with it keeps zero-padded rank exactly zero, so a
  rank-4 adapter in a rank-8 bank stays a rank-4 adapter.
  """
  return family_of_bank(bank).rank_mask(bank)


def present_capacity(cfg: OptimizerConfig, num_slots: int,
                     batch_rows: int | None = None) -> int | None:
  """Static slot count P the 'present' path gathers, or None for 'all'.

  Args:
    cfg: optimizer config (its `slot_sweep` decides).
    num_slots: S, slots in the bank (slot 0 included).
    batch_rows: global rows of the batch (each active slot has one at
      least); None bounds P by S - 1 only.
  """
  cap = num_slots - 1 if batch_rows is None else min(num_slots - 1,
                                                     batch_rows)
  cap = max(cap, 1)
  if cfg.slot_sweep == "all" or (cfg.slot_sweep == "auto" and
                                 2 * cap >= num_slots):
    return None
  return cap


def _adamw(cfg: OptimizerConfig, params: dict, grads: dict, mu: dict,
           nu: dict, *, count_n, active_n, grad_norm_n):
  """Clip + AdamW on N slots stacked on axis 0 (all S, or P gathered).

  Rows where `active_n` [N] is False come back unchanged (selected with
  `jnp.where`). Both paths call this, which keeps them bit-identical.

  Args:
    count_n: [N] int32 steps taken; grad_norm_n: [N] pre-clip norms.

  Returns:
    (params, mu, nu, count_n).
  """
  # Materialised inputs: XLA then emits one graph of elementwise ops for
  # N = S and N = P; with a gather fused in, its simplifier and fusion may
  # regroup the multiplies differently (1-ulp differences between paths).
  params, grads, mu, nu, count_n, active_n, grad_norm_n = (
      jax.lax.optimization_barrier(
          (params, grads, mu, nu, count_n, active_n, grad_norm_n)))
  if cfg.clip_norm > 0:
    factor_n = jnp.minimum(1.0, cfg.clip_norm / (grad_norm_n + 1e-6))
    grads = jax.tree.map(lambda g: g * _bcast(factor_n, g).astype(g.dtype),
                         grads)
  new_count_n = jnp.where(active_n, count_n + 1, count_n)
  lr_n = learning_rate(cfg, count_n)  # elementwise: the same for S and P
  t = new_count_n.astype(jnp.float32)
  corr1_n = 1.0 - jnp.power(jnp.float32(cfg.b1), t)
  corr2_n = 1.0 - jnp.power(jnp.float32(cfg.b2), t)

  def update(p, g, m, v):
    g32 = g.astype(jnp.float32)
    m_new = cfg.b1 * m + (1.0 - cfg.b1) * g32
    v_new = cfg.b2 * v + (1.0 - cfg.b2) * jnp.square(g32)
    act = _bcast(active_n, p)
    # Inactive slots have corr == 0; the where below discards their values.
    c1 = jnp.where(act, _bcast(corr1_n, p), 1.0)
    c2 = jnp.where(act, _bcast(corr2_n, p), 1.0)
    step = (m_new / c1) / (jnp.sqrt(v_new / c2) + cfg.eps)
    p32 = p.astype(jnp.float32)
    if cfg.weight_decay > 0:
      step = step + cfg.weight_decay * p32
    p_new = (p32 - _bcast(lr_n, p) * step).astype(p.dtype)
    return (jnp.where(act, p_new, p), jnp.where(act, m_new, m),
            jnp.where(act, v_new, v))

  out = jax.tree.map(update, params, grads, mu, nu)
  is_triple = lambda x: isinstance(x, tuple) and len(x) == 3
  pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=is_triple)
  return pick(0), pick(1), pick(2), new_count_n


def apply_updates(cfg: OptimizerConfig, params: dict, grads: dict,
                  state: SlotOptState, active_s, rank_mask_tree=None, *,
                  batch_rows: int | None = None):
  """One AdamW step on the active slots; inactive slots are returned as is.

  Args:
    cfg: optimizer config.
    params: {'lora_a', 'lora_b'} trees with a leading slot axis S.
    grads: gradients, same tree as `params`.
    state: optimizer state.
    active_s: [S] bool, slots that had examples in this batch (slot 0 is
      forced inactive).
    rank_mask_tree: optional `rank_mask(bank)`, applied to the gradients.
    batch_rows: global rows of the batch (static): at most this many slots
      are active, which sizes the 'present' path (`present_capacity`).

  Returns:
    (new params, new state, metrics) with metrics {'grad_norm': [S],
    'lr': [S]} (the norm before clipping).
  """
  num_slots = active_s.shape[0]
  active_s = active_s & (jnp.arange(num_slots) != 0)
  lr_s = learning_rate(cfg, state.count)
  norm_s = _grad_norms(grads, rank_mask_tree)
  metrics = {"grad_norm": norm_s, "lr": lr_s}
  mask = lambda g, m: g * m.astype(g.dtype)
  cap = present_capacity(cfg, num_slots, batch_rows)
  if cap is None:
    if rank_mask_tree is not None:
      grads = jax.tree.map(mask, grads, rank_mask_tree)
    new_params, mu, nu, count_s = _adamw(
        cfg, params, grads, state.mu, state.nu, count_n=state.count,
        active_n=active_s, grad_norm_n=norm_s)
    return new_params, SlotOptState(mu, nu, count_s), metrics

  # Ascending active slots, then padding index S (out of range: gathers
  # clip it to slot S - 1 and the result is discarded, scatters drop it).
  (slots_p,) = jnp.nonzero(active_s, size=cap, fill_value=num_slots)

  def take(x):
    return jnp.take(x, slots_p, axis=0, mode="clip", indices_are_sorted=True)

  def put(x, x_p):
    return x.at[slots_p].set(x_p, mode="drop", indices_are_sorted=True)

  take_all = lambda tree: jax.tree.map(take, tree)
  grads_p = take_all(grads)
  if rank_mask_tree is not None:
    grads_p = jax.tree.map(mask, grads_p, take_all(rank_mask_tree))
  params_p, mu_p, nu_p, count_p = _adamw(
      cfg, take_all(params), grads_p, take_all(state.mu),
      take_all(state.nu), count_n=take(state.count),
      active_n=slots_p < num_slots, grad_norm_n=take(norm_s))
  new_state = SlotOptState(mu=jax.tree.map(put, state.mu, mu_p),
                           nu=jax.tree.map(put, state.nu, nu_p),
                           count=put(state.count, count_p))
  return jax.tree.map(put, params, params_p), new_state, metrics
