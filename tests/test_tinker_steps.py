"""The split forward-backward / optim programs (mintjax.train.split_step).

Per-slot isolation with per-slot Adam parameters, on a tiny random model
with real compiled steps. Marked `tinker` (it compiles a train step; the
default suite's budget is spent): `make test-tinker`.
"""

import jax
import numpy as np
import pytest

from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import ALL_TARGETS, BankSpec
from mintjax.model.sources import RANDOM_VARIANTS
from mintjax.model.base import random_base
from mintjax.train import optimizer as opt_lib
from mintjax.train import split_step
from mintjax.train.cohort import init_adapter

pytestmark = pytest.mark.tinker
S = 4


@pytest.fixture(scope="module")
def setup():
  base = random_base(RANDOM_VARIANTS["tiny"], seed=0)
  spec = BankSpec(targets=ALL_TARGETS, max_rank=4, num_slots=S)
  weights = {s: init_adapter(base.config, ALL_TARGETS if s != 3 else
                             ("q", "v"), 4 if s != 2 else 2, 8.0, f"u{s}", 0)
             for s in (1, 2, 3)}
  # B = 0 at init: make it non-zero so every slot's forward depends on it.
  for w in weights.values():
    for t in w.lora_b:
      w.lora_b[t][:] = 0.01
  bank = bank_lib.bank_from_weights(base.config, spec, weights)
  return base, bank, split_step.make_split_steps(base.config)


def _batch(slots, t=8, kind=0):
  rng = np.random.default_rng(0)
  b = len(slots)
  toks = rng.integers(3, 250, (b, t + 1)).astype(np.int32)
  z = np.zeros((b, t), np.float32)
  return split_step.TokenBatch(
      tokens=toks[:, :-1], targets=toks[:, 1:],
      positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
      segment_ids=np.ones((b, t), np.int32),
      adapter_idx=np.asarray(slots, np.int32),
      loss_kind=np.full(b, kind, np.int32), train=np.ones(b, np.float32),
      weights=z + 1, advantages=z + 1, sampling_logprobs=z - 5.0,
      clip_low=z + 0.8, clip_high=z + 1.2)


def _hp(lr):
  lr = np.asarray(lr, np.float32)
  return split_step.OptimParams(
      learning_rate=lr, beta1=np.full(S, 0.9, np.float32),
      beta2=np.full(S, 0.95, np.float32), eps=np.full(S, 1e-8, np.float32),
      weight_decay=np.zeros(S, np.float32),
      grad_clip_norm=np.full(S, 1.0, np.float32))


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_only_active_slots_move_with_their_own_learning_rate(setup):
  base, bank0, steps = setup
  bank = jax.tree.map(jax.numpy.array, bank0)
  opt = opt_lib.init_opt_state(bank)
  acc = split_step.zero_grads(bank)
  # Slots 1, 2 and 3 have rows (slot 0 is padding).
  acc, logp, loss = steps.forward_backward(base.params, bank, acc,
                                           _batch([1, 2, 3, 0], kind=1))
  assert np.isfinite(np.asarray(loss)).all() and np.asarray(logp).max() <= 0
  acc_host = _copy(acc)
  assert np.asarray(acc_host["lora_b"]["q"][3]).any()  # slot 3: a gradient
  for t in ALL_TARGETS:  # slot 0 (the null adapter) gets none
    assert not np.asarray(acc_host["lora_a"][t][0]).any()
    assert not np.asarray(acc_host["lora_b"][t][0]).any()
  before = _copy((bank, opt))
  mask = {t: np.array([0, 1, 1, float(t in ("q", "v"))], np.float32)
          for t in ALL_TARGETS}
  # Slot 1 steps with lr 1e-2, slot 2 is active with lr 0; slot 3 has a
  # gradient and a learning rate but is not stepped now: it must not move.
  bank, opt, acc, metrics = steps.optim_step(
      bank, opt, acc, _hp([0, 1e-2, 0, 1e-2]),
      np.array([False, True, True, False]), mask)
  (b0, o0), b1, o1 = before, _copy(bank), _copy(opt)
  for t in ALL_TARGETS:
    assert not np.array_equal(b1.lora_a[t][1], b0.lora_a[t][1])
    np.testing.assert_array_equal(b1.lora_a[t][2], b0.lora_a[t][2])  # lr 0
    np.testing.assert_array_equal(b1.lora_a[t][3], b0.lora_a[t][3])
    np.testing.assert_array_equal(b1.lora_b[t][3], b0.lora_b[t][3])
    np.testing.assert_array_equal(o1.mu["lora_b"][t][3],
                                  o0.mu["lora_b"][t][3])
    np.testing.assert_array_equal(np.asarray(acc["lora_b"][t][3]),
                                  acc_host["lora_b"][t][3])
    np.testing.assert_array_equal(b1.lora_b[t][0], b0.lora_b[t][0])
    # The stepped slots' accumulators are cleared, the others kept.
    assert not np.asarray(acc["lora_b"][t][1]).any()
  assert list(np.asarray(opt.count)) == [0, 1, 1, 0]
  assert np.asarray(metrics["grad_norm"])[1] > 0
  # Slot 2 trains rank 2 in a rank-4 bank: padding stays exactly zero.
  for t in ALL_TARGETS:
    assert not b1.lora_a[t][2][..., 2:].any()


def test_forward_only_rows_leave_the_accumulator_alone(setup):
  base, bank0, steps = setup
  bank = jax.tree.map(jax.numpy.array, bank0)
  acc = split_step.zero_grads(bank)
  batch = _batch([1, 2])
  batch = batch.replace(train=np.zeros(2, np.float32))
  acc, logp, _ = steps.forward_backward(base.params, bank, acc, batch)
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(acc))
  lp2 = steps.token_logprobs(base.params, bank, batch)
  np.testing.assert_allclose(np.asarray(lp2), np.asarray(logp), rtol=1e-6,
                             atol=1e-6)
