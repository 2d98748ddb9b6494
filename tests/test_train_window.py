"""The completion loss window: same loss and updates as the full-width head."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smollm2_personal
from mintjax import sharding
from mintjax.adapters.spec import AdapterSpec
from mintjax.apps.personal_data import write_personal_data
from mintjax.model.base import random_base
from mintjax.store.registry import Registry
from mintjax.apps import train_workflow
from mintjax.model.sources import RANDOM_VARIANTS
from mintjax.train import optimizer as opt_lib
from mintjax.train.cohort import SlotMap, cohort_bank, init_adapter
from mintjax.train.data import DataError
from mintjax.train.loss import completion_window
from mintjax.train.step import Batch, StepConfig, make_train_step

CFG = RANDOM_VARIANTS["tiny"]
SPEC = AdapterSpec(targets=("q", "v"), max_rank=2, num_slots=4)
OPT = opt_lib.OptimizerConfig(learning_rate=1e-2)


def _batch():
  """8 rows of T=12: prompts of different lengths, completions of 1-3."""
  rng = np.random.default_rng(0)
  b, t = 8, 12
  tokens = rng.integers(3, 250, (b, t + 1)).astype(np.int32)
  mask = np.zeros((b, t), np.float32)
  for r in range(b):
    start = 2 + r % 5
    mask[r, start:start + 1 + r % 3] = 1.0
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  return Batch(tokens=jnp.asarray(tokens[:, :-1]),
               targets=jnp.asarray(tokens[:, 1:]),
               loss_mask=jnp.asarray(mask), positions=jnp.asarray(pos),
               segment_ids=jnp.ones((b, t), jnp.int32),
               adapter_idx=jnp.asarray([1, 2, 3, 1, 2, 3, 0, 1], jnp.int32),
               weight=jnp.asarray([1, 1, 1, 1, 1, 1, 0, 1], jnp.float32))


def _run(window):
  base = random_base(CFG, seed=0)
  mesh = sharding.make_mesh(fsdp=-1)
  step = make_train_step(CFG, SPEC, OPT, mesh, StepConfig(
      lora_impl="gather", loss_window=window))
  users = ["a", "b", "c"]
  init = {u: init_adapter(CFG, SPEC.targets, 2, 4.0, u, 0) for u in users}
  # Non-zero B so the first step's gradient reaches A as well.
  for w in init.values():
    for t in w.lora_b:
      w.lora_b[t][...] = 0.01
  bank = cohort_bank(CFG, SPEC, SlotMap.for_cohort(users, 4), init)
  opt = opt_lib.init_opt_state(bank)
  batch = _batch()
  for _ in range(2):
    bank, opt, m = step(base.params, bank, opt, batch)
  return jax.device_get(bank), jax.device_get(m)


def test_window_matches_full_head():
  bank_full, m_full = _run(0)
  bank_win, m_win = _run(4)
  np.testing.assert_allclose(m_win["loss_s"], m_full["loss_s"], rtol=1e-5,
                             atol=1e-6)
  assert float(m_win["dropped_tokens"]) == 0.0
  for t in SPEC.targets:
    np.testing.assert_allclose(bank_win.lora_a[t], bank_full.lora_a[t],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bank_win.lora_b[t], bank_full.lora_b[t],
                               rtol=1e-4, atol=1e-6)


def test_window_too_short_reports_dropped_tokens():
  _, m = _run(2)   # rows 2 and 5 have 3 completion targets
  assert float(m["dropped_tokens"]) == 2.0


def test_completion_window_near_row_end():
  """A completion at the very end of the row is still fully inside."""
  hidden = jnp.arange(2 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 1)
  targets = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  mask = jnp.zeros((2, 6)).at[0, 5].set(1).at[1, 1:3].set(1)
  h, tg, mw, dropped = completion_window(hidden, targets, mask, 3)
  np.testing.assert_array_equal(tg, [[3, 4, 5], [7, 8, 9]])
  np.testing.assert_array_equal(mw, [[0, 0, 1], [1, 1, 0]])
  np.testing.assert_array_equal(h[..., 0], [[3, 4, 5], [7, 8, 9]])
  np.testing.assert_array_equal(dropped, [0, 0])
  with pytest.raises(ValueError, match="completion window"):
    completion_window(hidden, targets, mask, 7)


def test_loop_refuses_completions_longer_than_window(tmp_path):
  paths = write_personal_data(str(tmp_path / "data"), num_users=2, seed=1)
  c = smollm2_personal.get_config("tiny")
  c.train_data, c.heldout_data = paths["train"], paths["heldout"]
  c.registry = str(tmp_path / "registry")
  c.batch_size, c.steps_per_cohort, c.num_slots = 8, 2, 3
  c.loss_window = 3   # byte-level completions like " Luna" + eos are longer
  with pytest.raises(DataError, match="loss_window"):
    train_workflow.train_and_publish(c, str(tmp_path / "work"))
  assert Registry.open(c.registry).list_adapters() == []
  assert not os.path.exists(tmp_path / "work" / "metrics.jsonl")
