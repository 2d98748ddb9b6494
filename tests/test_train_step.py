"""Tests of the multi-tenant train step and per-slot AdamW isolation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model.base import random_base
from mintjax.train import optimizer as opt_lib
from mintjax.train.step import Batch, StepConfig, make_train_step

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
SPEC = AdapterSpec(targets=("q", "v", "down"), max_rank=4, num_slots=6)
OPT = opt_lib.OptimizerConfig(learning_rate=1e-2, weight_decay=0.1,
                              clip_norm=1.0, warmup_steps=2,
                              schedule="cosine", decay_steps=50)


@pytest.fixture(scope="module")
def base():
  return random_base(CFG, seed=0)


def _bank(seed=0):
  ws = {s: AdapterWeights.random(CFG, SPEC.targets, rank=4 if s % 2 else 2,
                                 seed=seed + s) for s in range(1, 6)}
  return bank_lib.bank_from_weights(CFG, SPEC, ws)



def _batch(rng, slots, t=12):
  return Batch.from_token_rows(rng.integers(3, 259, (len(slots), t + 1)),
                               slots)


def _host(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


@pytest.mark.parametrize("sweep", ["all", "present"])
def test_untouched_slot_and_null_slot_are_bit_identical_after_100_steps(
    base, sweep):
  mesh = sharding.make_mesh(data=2, fsdp=4)
  opt_cfg = dataclasses.replace(OPT, slot_sweep=sweep)
  step = make_train_step(CFG, SPEC, opt_cfg, mesh,
                         StepConfig(lora_impl="gather"))
  bank = _bank()
  opt = opt_lib.init_opt_state(bank)
  before_bank, before_opt = _host(bank), _host(opt)
  rng = np.random.default_rng(0)
  for _ in range(100):
    # Slot 3 never appears; slot 0 appears as base rows with weight.
    slots = rng.choice([0, 1, 2, 4, 5], size=8)
    bank, opt, metrics = step(base.params, bank, opt, _batch(rng, slots))
  after_bank, after_opt = _host(bank), _host(opt)
  for k in (3, 0):
    for t in SPEC.targets:
      np.testing.assert_array_equal(after_bank.lora_a[t][k],
                                    before_bank.lora_a[t][k])
      np.testing.assert_array_equal(after_bank.lora_b[t][k],
                                    before_bank.lora_b[t][k])
    # Every optimizer leaf (moments of both factors, step count) of the
    # untouched slots is exactly what it was before the 100 steps.
    jax.tree.map(lambda x, y, k=k: np.testing.assert_array_equal(x[k], y[k]),
                 after_opt, before_opt)
    assert after_opt.count[k] == 0
  # Trained slots moved and counted their own steps.
  assert after_opt.count[1] > 0 and after_opt.count[1] < 100
  assert not np.array_equal(after_bank.lora_a["q"][1],
                            before_bank.lora_a["q"][1])
  assert np.isfinite(float(metrics["loss"]))


def test_trajectory_does_not_depend_on_batch_neighbours(base):
  mesh = sharding.make_mesh(data=1, fsdp=-1)
  step = make_train_step(CFG, SPEC, OPT, mesh, StepConfig(lora_impl="gather"))
  rng = np.random.default_rng(1)
  user_batches = [_batch(rng, [2, 2]) for _ in range(5)]
  other_batches = [_batch(rng, [1, 4, 5, 1, 4, 5]) for _ in range(5)]

  def concat(a, b):
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)

  alone, mixed = _bank(), _bank()
  opt_a, opt_m = opt_lib.init_opt_state(alone), opt_lib.init_opt_state(mixed)
  for ub, ob in zip(user_batches, other_batches):
    alone, opt_a, _ = step(base.params, alone, opt_a, concat(
        ub, jax.tree.map(lambda x: x[:6] * 0, ob)))  # padding rows, slot 0
    mixed, opt_m, _ = step(base.params, mixed, opt_m, concat(ub, ob))
  for t in SPEC.targets:
    np.testing.assert_allclose(np.asarray(alone.lora_a[t][2]),
                               np.asarray(mixed.lora_a[t][2]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(alone.lora_b[t][2]),
                               np.asarray(mixed.lora_b[t][2]),
                               rtol=1e-5, atol=1e-6)
  # The neighbours did train in the mixed run.
  assert not np.array_equal(np.asarray(alone.lora_a["q"][1]),
                            np.asarray(mixed.lora_a["q"][1]))


@pytest.mark.parametrize("sweep", ["all", "present"])
def test_rank_padding_stays_zero_and_loss_decreases(base, sweep):
  mesh = sharding.make_mesh(data=1, fsdp=-1)
  opt = opt_lib.OptimizerConfig(learning_rate=3e-2, slot_sweep=sweep)
  step = make_train_step(CFG, SPEC, opt, mesh, StepConfig(lora_impl="gather"))
  bank = _bank()
  state = opt_lib.init_opt_state(bank)
  batch = _batch(np.random.default_rng(2), [2, 4, 2, 4, 2, 4, 2, 4])
  losses = []
  for _ in range(15):
    bank, state, m = step(base.params, bank, state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.5
  # Slot 2 has true rank 2 in a rank-4 bank: padded columns/rows stay zero.
  np.testing.assert_array_equal(np.asarray(bank.lora_a["q"][2, ..., 2:]), 0)
  np.testing.assert_array_equal(np.asarray(bank.lora_b["v"][2, :, 2:, :]), 0)


def test_per_slot_schedule_and_bias_correction_follow_own_count():
  lr = opt_lib.learning_rate(OPT, jnp.array([0, 1, 2, 27, 52]))
  np.testing.assert_allclose(np.asarray(lr),
                             [5e-3, 1e-2, 1e-2, 5e-3, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match="decay_steps"):
    opt_lib.OptimizerConfig(schedule="cosine")
