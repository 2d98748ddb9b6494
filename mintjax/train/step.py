"""The compiled multi-tenant train step: many users' adapters in one program.

Owns `Batch` (the arrays one step consumes), `batch_logical_axes`, and
`make_train_step`, the factory that builds the step once with `jax.jit`,
explicit in/out shardings over the mesh, and the adapter bank and optimizer
state donated. The base parameters are an ordinary (frozen) input and are
never differentiated: the gradient is taken with respect to the leaves the
bank's adapter family trains (`AdapterFamily.trainable`: LoRA's factors,
VeRA's scaling vectors, the bank being materialised inside the loss by
`to_lora_bank`), and every row's adapter is gathered by its `adapter_idx`
through the gather-LoRA op (`mintjax.model.llama.forward(lora_impl=...)`).
The optimizer touches only the slots present in the batch when the batch's
rows are few next to the bank's slots (`optimizer.present_capacity`).
Swapping which users sit in the slots changes only array values, so the
step never recompiles across cohorts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mintjax import sharding
from mintjax.adapters.bank import AdapterBank
from mintjax.adapters.spec import BankSpec
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.train import loss as loss_lib
from mintjax.train import optimizer as opt_lib


@flax.struct.dataclass
class Batch:
  """One training batch (B rows of length T).

  Attributes:
    tokens: [B, T] int32 input ids.
    targets: [B, T] int32 next-token targets.
    loss_mask: [B, T] float32, 1.0 where the target is a completion token.
    positions: [B, T] int32 positions (restart at 0 per packed segment).
    segment_ids: [B, T] int32 packed-sequence ids (0 = padding).
    adapter_idx: [B] int32 slot of each row (0 = null adapter / padding).
    weight: [B] float32 per-example weight (0 for padding rows).
  """

  tokens: jax.Array
  targets: jax.Array
  loss_mask: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  adapter_idx: jax.Array
  weight: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.tokens.shape)

  @classmethod
  def from_token_rows(cls, tokens_bt1, adapter_idx_b) -> "Batch":
    """A batch of unpacked rows whose second half is the trained completion.

    Benchmarks, the scaling study and tests use it on synthetic tokens.

    Args:
      tokens_bt1: [B, T + 1] int token rows (inputs are [:, :-1], targets
        [:, 1:]).
      adapter_idx_b: [B] slot of each row.
    """
    tokens_bt1 = np.asarray(tokens_bt1)
    b, t = tokens_bt1.shape[0], tokens_bt1.shape[1] - 1
    mask_bt = np.zeros((b, t), np.float32)
    mask_bt[:, t // 2:] = 1.0
    return cls(tokens=jnp.asarray(tokens_bt1[:, :-1], jnp.int32),
               targets=jnp.asarray(tokens_bt1[:, 1:], jnp.int32),
               loss_mask=jnp.asarray(mask_bt),
               positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32),
                                          (b, t)),
               segment_ids=jnp.ones((b, t), jnp.int32),
               adapter_idx=jnp.asarray(adapter_idx_b, jnp.int32),
               weight=jnp.ones((b,), jnp.float32))


def batch_logical_axes() -> Batch:
  bt = ("batch", "length")
  return Batch(tokens=bt, targets=bt, loss_mask=bt, positions=bt,
               segment_ids=bt, adapter_idx=("batch",), weight=("batch",))


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static choices baked into the compiled step.

  Attributes:
    lora_impl: gather-LoRA implementation ('auto' picks per backend).
    remat: rematerialise each layer in the backward pass.
    loss_window: 0 applies the LM head at every position; W > 0 applies it
      only to a W-long window starting at each row's first completion
      target (see `loss.completion_window`). Every example's completion
      (plus eos) must fit in W; `train_and_publish` checks that before any
      step and the step reports any overflow as 'dropped_tokens'.
    compute_dtype: None computes in the model's dtype; 'bfloat16' casts
      the frozen base to bf16 for the forward and backward matmuls (f32
      accumulation) while the adapter bank (the master weights), its
      gradients and the optimizer moments stay float32. Pass the base
      already in bf16 to skip the per-step cast.
  """

  lora_impl: str = "auto"
  remat: bool = False
  loss_window: int = 0
  compute_dtype: str | None = None

  def __post_init__(self):
    if self.compute_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(
          f"StepConfig.compute_dtype must be None, 'float32' or 'bfloat16', "
          f"got {self.compute_dtype!r}")


def train_step(base_params: dict, bank: AdapterBank,
               opt_state: opt_lib.SlotOptState, batch: Batch, *,
               config: ModelConfig, opt_cfg: opt_lib.OptimizerConfig,
               step_cfg: StepConfig):
  """One multi-tenant step (uncompiled; `make_train_step` jits it).

  Returns:
    (new bank, new optimizer state, metrics) where metrics holds 'loss'
    (mean over present slots of per-slot loss), 'loss_s' [S], 'tokens_s' [S],
    'present_s' [S], 'grad_norm' [S], 'lr' [S], 'count' [S] and
    'dropped_tokens' (weighted completion targets outside the loss window;
    0 unless the window is too short); on MoE bases also 'router_load_le'
    [L, E], the fraction of each layer's routed (token, expert) pairs per
    expert (every position of the batch counts, padding included; zeros
    for dense layers).
  """
  num_slots = bank.num_slots
  base_params = jax.lax.stop_gradient(base_params)
  if step_cfg.compute_dtype is not None:
    config = dataclasses.replace(config, dtype=step_cfg.compute_dtype)
    cdt = jnp.dtype(step_cfg.compute_dtype)
    base_params = jax.tree.map(
        lambda x: x.astype(cdt) if jnp.issubdtype(x.dtype, jnp.floating)
        else x, base_params)

  def loss_fn(trainable):
    b = opt_lib.forward_bank(bank, trainable)  # VeRA: materialised here.
    moe_stats = config.num_moe_layers > 0
    outs = llama.forward(
        base_params, b, batch.adapter_idx, batch.tokens, batch.positions,
        config=config, segment_ids_bt=batch.segment_ids,
        lora_impl=step_cfg.lora_impl, remat=step_cfg.remat,
        return_hidden=True, return_router_stats=moe_stats)
    logits_btv, _, hidden_btd = outs[:3]
    targets_bt, mask_bt = batch.targets, batch.loss_mask
    dropped = jnp.zeros((), jnp.float32)
    if step_cfg.loss_window and step_cfg.loss_window < batch.tokens.shape[1]:
      # The full-width logits above are then unused and XLA drops them; the
      # head runs on the window only.
      hidden_bwd, targets_bt, mask_bt, dropped_b = loss_lib.completion_window(
          hidden_btd, targets_bt, mask_bt, step_cfg.loss_window)
      logits_btv = llama.lm_head(base_params, hidden_bwd, config=config)
      dropped = jnp.sum(dropped_b * batch.weight)
    loss, aux = loss_lib.multi_tenant_loss(
        logits_btv, targets_bt, mask_bt, batch.weight, batch.adapter_idx,
        num_slots)
    aux["dropped_tokens"] = dropped
    if moe_stats:  # MoE bases: the router's load per (layer, expert)
      aux["router_load_le"] = outs[3]["load_e"]
    return loss, aux

  trainable = opt_lib.trainable_params(bank)
  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  new_trainable, new_state, opt_metrics = opt_lib.apply_updates(
      opt_cfg, trainable, grads, opt_state, aux["present_s"],
      opt_lib.rank_mask(bank), batch_rows=batch.adapter_idx.shape[0])
  new_bank = bank.replace(**new_trainable)
  present_s = aux["present_s"].at[0].set(False)
  n_present = jnp.maximum(jnp.sum(present_s), 1)
  metrics = dict(
      loss=jnp.sum(jnp.where(present_s, aux["loss_s"], 0.0)) / n_present,
      loss_s=aux["loss_s"], tokens_s=aux["tokens_s"], present_s=present_s,
      count=new_state.count, dropped_tokens=aux["dropped_tokens"],
      **opt_metrics)
  if "router_load_le" in aux:
    metrics["router_load_le"] = aux["router_load_le"]
  return new_bank, new_state, metrics


def state_shardings(mesh, config: ModelConfig, spec: BankSpec,
                    rules=None):
  """NamedShardings of (base params, bank, optimizer state, batch axes)."""
  params_sh = sharding.logical_sharding(
      llama.param_logical_axes(config), llama.param_shapes(config), mesh, rules)
  shapes = opt_lib.train_bank_shapes(config, spec)  # the family's bank
  bank_sh = sharding.logical_sharding(opt_lib.train_bank_logical_axes(spec),
                                      shapes, mesh, rules)
  opt_shapes = opt_lib.SlotOptState(
      mu=opt_lib.trainable_params(shapes), nu=opt_lib.trainable_params(shapes),
      count=shapes.rank)
  opt_sh = sharding.logical_sharding(opt_lib.opt_logical_axes(spec),
                                     opt_shapes, mesh, rules)
  return params_sh, bank_sh, opt_sh


def make_train_step(config: ModelConfig, spec: BankSpec,
                    opt_cfg: opt_lib.OptimizerConfig, mesh,
                    step_cfg: StepConfig = StepConfig(), rules=None
                    ) -> Callable:
  """Builds the compiled step `(base, bank, opt_state, batch) -> (bank,
  opt_state, metrics)`.

  The bank (argument 1) and optimizer state (argument 2) are donated: do not
  use them after the call. Batches may come in several length buckets; each
  bucket compiles once. Rows of the batch are split over the mesh's data and
  fsdp axes where the batch size allows.
  """
  params_sh, bank_sh, opt_sh = state_shardings(mesh, config, spec, rules)
  # Batch rows shard over ('data', 'fsdp'); the spec does not depend on T
  # as long as the length axis is unsharded, which the rules guarantee.
  row_spec = sharding.logical_to_spec(("batch",), (mesh.size,), mesh, rules)
  bt_sh = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(row_spec[0], None))
  b_sh = jax.sharding.NamedSharding(mesh, row_spec)
  batch_sh = Batch(tokens=bt_sh, targets=bt_sh, loss_mask=bt_sh,
                   positions=bt_sh, segment_ids=bt_sh, adapter_idx=b_sh,
                   weight=b_sh)
  rep = sharding.replicated(mesh)

  def step(base_params, bank, opt_state, batch):
    with sharding.use_mesh_rules(mesh, rules):
      return train_step(base_params, bank, opt_state, batch, config=config,
                        opt_cfg=opt_cfg, step_cfg=step_cfg)

  jitted = jax.jit(step, in_shardings=(params_sh, bank_sh, opt_sh, batch_sh),
                   out_shardings=(bank_sh, opt_sh, rep),
                   donate_argnums=(1, 2))
  rows = 1
  for ax in (row_spec[0] if isinstance(row_spec[0], tuple) else
             (row_spec[0],) if row_spec[0] else ()):
    rows *= mesh.shape[ax]
  return TrainStep(jitted, batch_sh, (params_sh, bank_sh, opt_sh), rows)


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The compiled step plus the shardings its inputs must have.

  Attributes:
    jitted: the `jax.jit`-wrapped step.
    batch_sharding: `Batch` of NamedShardings for the batch.
    state_shardings: (base params, bank, optimizer state) shardings.
    row_multiple: batch rows must be a multiple of this (the number of
      devices rows are split over).
  """

  jitted: Callable
  batch_sharding: Batch
  state_shardings: tuple
  row_multiple: int

  def check_batch(self, batch: Batch) -> None:
    b = batch.tokens.shape[0]
    if b % self.row_multiple:
      raise ValueError(
          f"batch has {b} rows but the mesh splits rows over "
          f"{self.row_multiple} devices; use a batch size that is a multiple "
          f"of {self.row_multiple} (pad with weight-0 rows of slot 0)")

  def __call__(self, base_params, bank, opt_state, batch):
    self.check_batch(batch)
    return self.jitted(base_params, bank, opt_state, batch)

  def lower(self, *args):
    return self.jitted.lower(*args)


def log_memory_analysis(step_fn, *args) -> dict:
  """Lowers and compiles `step_fn` for `args`; logs and returns its memory.

  Returns:
    {'argument_bytes', 'output_bytes', 'temp_bytes', 'peak_bytes'} where the
    backend reports them (empty dict otherwise).
  """
  compiled = step_fn.lower(*args).compile()
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # backend-dependent
    mem = None
  if mem is None:
    return {}
  out = dict(argument_bytes=int(mem.argument_size_in_bytes),
             output_bytes=int(mem.output_size_in_bytes),
             temp_bytes=int(mem.temp_size_in_bytes))
  out["peak_bytes"] = sum(out.values()) - int(
      getattr(mem, "alias_size_in_bytes", 0))
  logging.info("train step memory: %s", out)
  return out
