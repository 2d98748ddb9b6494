"""The present-slot optimizer path equals the all-slot path bit for bit.

`OptimizerConfig.slot_sweep='present'` gathers only the slots active in the
batch, runs the per-slot AdamW on them and scatters them back; 'all' sweeps
the whole bank with `jnp.where`. Over several compiled train steps with
slots entering and leaving the batch, duplicate rows, weight-0 rows and a
batch whose every row is slot 0, both paths must leave the bank, every
optimizer leaf and the metrics exactly equal; absent slots and slot 0 must
not move at all.
"""

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
# 24 slots, 8 rows a batch: at most 8 present, so 'auto' picks 'present'.
SPEC = AdapterSpec(targets=("q", "v", "down"), max_rank=4, num_slots=24)
ROWS = 8
HP = dict(learning_rate=1e-2, weight_decay=0.1, clip_norm=0.5,
          warmup_steps=2, schedule="cosine", decay_steps=50)
# Slots of each step's rows: enter/leave, duplicates, a lone slot, the top
# slot (S - 1, next to the padding index), and a batch of slot 0 only.
PLAN = [[1, 2, 3, 3, 3, 0, 5, 23],
        [2, 2, 2, 2, 7, 7, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 23, 9, 10, 11, 12, 13, 14],
        [4, 4, 4, 4, 4, 4, 4, 4],
        [1, 2, 3, 5, 7, 9, 23, 22]]


@pytest.fixture(scope="module")
def base():
  return random_base(CFG, seed=0)


def _bank():
  # Mixed true ranks (2 and 4) so the rank mask matters; slot 20 empty.
  ws = {s: AdapterWeights.random(CFG, SPEC.targets, rank=4 if s % 2 else 2,
                                 seed=s) for s in range(1, 24) if s != 20}
  return bank_lib.bank_from_weights(CFG, SPEC, ws)


def _host(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def _assert_same(a, b, what):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, err_msg=what),
               a, b)


def test_capacity_and_auto_choice():
  auto = opt_lib.OptimizerConfig()
  assert opt_lib.present_capacity(auto, 24, 8) == 8
  assert opt_lib.present_capacity(auto, 24, 100) is None  # P = 23 >= 12
  assert opt_lib.present_capacity(auto, 16, 8) is None    # 8 >= 16 / 2
  forced = opt_lib.OptimizerConfig(slot_sweep="present")
  assert opt_lib.present_capacity(forced, 17, 100) == 16
  assert opt_lib.present_capacity(
      opt_lib.OptimizerConfig(slot_sweep="all"), 1024, 8) is None
  with pytest.raises(ValueError, match="slot_sweep"):
    opt_lib.OptimizerConfig(slot_sweep="some")


@pytest.mark.parametrize("rules", ["default", "slot_sharded"])
def test_train_steps_bit_identical_on_both_paths(base, rules):
  # slot_sharded splits the bank's slot axis over fsdp: the gather and the
  # scatter then cross shards (the 8B-on-v5e-8 layout, docs/SCALE_UP.md).
  mesh = sharding.make_mesh(data=2, fsdp=4)
  rng = np.random.default_rng(0)
  batches = []
  for slots in PLAN:
    b = Batch.from_token_rows(rng.integers(3, 259, (ROWS, 13)), slots)
    batches.append(b)
  # A weight-0 row of slot 6: in adapter_idx but not present.
  batches[1] = batches[1].replace(
      adapter_idx=batches[1].adapter_idx.at[7].set(6),
      weight=batches[1].weight.at[7].set(0.0))
  runs = {}
  for sweep in ("all", "present"):
    opt_cfg = opt_lib.OptimizerConfig(slot_sweep=sweep, **HP)
    step = make_train_step(CFG, SPEC, opt_cfg, mesh,
                           StepConfig(lora_impl="gather"),
                           rules=sharding.RULE_SETS[rules])
    bank = _bank()
    opt = opt_lib.init_opt_state(bank)
    before = _host(bank)
    trace = []
    for b in batches:
      bank, opt, m = step(base.params, bank, opt, b)
      trace.append(_host((bank, opt, m)))
    runs[sweep] = (before, trace)
  before, trace_all = runs["all"]
  _, trace_present = runs["present"]
  for i, (a, p) in enumerate(zip(trace_all, trace_present)):
    _assert_same(a, p, f"step {i}")
  bank, opt, _ = trace_present[-1]
  touched = set(s for row in PLAN for s in row) - {0}
  for s in range(24):
    moved = not np.array_equal(bank.lora_a["q"][s], before.lora_a["q"][s])
    assert moved == (s in touched and s != 20), s
  for s in (0, 6, 8, 15, 20):  # never trained: weights and state as built
    _assert_same(jax.tree.map(lambda x, s=s: x[s], bank),
                 jax.tree.map(lambda x, s=s: x[s], before), f"slot {s}")
    assert opt.count[s] == 0
    _assert_same(jax.tree.map(lambda x, s=s: x[s], opt.mu),
                 jax.tree.map(lambda x: np.zeros_like(x[0]), opt.mu),
                 f"slot {s} mu")
  assert opt.count[4] == 1 and opt.count[2] == 3 and opt.count[23] == 3
  # Rank padding of a rank-2 slot stays exactly zero.
  np.testing.assert_array_equal(bank.lora_a["q"][2, ..., 2:], 0)


def test_apply_updates_bit_identical_with_random_gradients():
  """Every slot, absent ones included, gets a non-zero gradient; only the
  active ones may change, identically on both paths."""
  bank = _bank()
  params = opt_lib.trainable_params(bank)
  state = opt_lib.init_opt_state(bank)
  outs = {}
  for sweep in ("all", "present"):
    cfg = opt_lib.OptimizerConfig(slot_sweep=sweep, **HP)
    apply = jax.jit(opt_lib.apply_updates, static_argnums=0,
                    static_argnames="batch_rows")
    p, st = params, state
    trace = []
    for i in range(4):
      g = jax.tree.map(lambda x, i=i: jnp.asarray(np.random.default_rng(
          i).standard_normal(x.shape), x.dtype), params)
      active = np.zeros(24, bool)
      active[[0, 3, 5, 23] if i % 2 else [1, 3, 22]] = True
      p, st, m = apply(cfg, p, g, st, jnp.asarray(active),
                       opt_lib.rank_mask(bank), batch_rows=ROWS)
      trace.append(_host((p, st, m)))
    outs[sweep] = trace
  for i, (a, b) in enumerate(zip(outs["all"], outs["present"])):
    _assert_same(a, b, f"step {i}")
  p, st, m = outs["present"][-1]
  for s in (0, 2, 4, 10):
    np.testing.assert_array_equal(p["lora_a"]["q"][s],
                                  np.asarray(params["lora_a"]["q"][s]))
    assert st.count[s] == 0
  # Absent slots' norms are reported too (their gradients here are not 0).
  assert np.all(m["grad_norm"][[2, 4, 10]] > 0)
  assert list(st.count[[1, 3, 5, 22, 23]]) == [2, 4, 2, 2, 2]
