"""End-to-end tests of the training run: cohorts, resume, publish, errors."""

import json
import os

import numpy as np
import pytest

from configs import smollm2_personal
from mintjax.apps.personal_data import write_personal_data
from mintjax.model.base import random_base
from mintjax.store.errors import BaseMismatchError
from mintjax.store.registry import Registry
from mintjax.apps import train_workflow
from mintjax.model.sources import RANDOM_VARIANTS


def _cfg(tmp, **over):
  paths = write_personal_data(os.path.join(tmp, "data"), num_users=5, seed=3)
  c = smollm2_personal.get_config("tiny")
  c.train_data = os.path.dirname(paths["train"])
  c.heldout_data = os.path.dirname(paths["heldout"])
  c.registry = os.path.join(tmp, "registry")
  c.num_slots = 4            # 3 users per cohort -> 2 cohorts
  c.batch_size = 8
  c.steps_per_cohort = 6
  c.checkpoint_every = 2
  c.log_every = 2
  c.lora_impl = "gather"
  c.async_checkpoint = True
  for k, v in over.items():
    setattr(c, k, v)
  return c


def _weights(reg, users):
  out = {}
  for u in users:
    _, w = reg.load(u)
    out[u] = w
  return out


def test_killed_run_resumes_bit_identical(tmp_path):
  full = _cfg(str(tmp_path / "a"))
  res_full = train_workflow.train_and_publish(full,
                                              str(tmp_path / "a" / "work"))
  assert not res_full["stopped"] and len(res_full["published"]) == 5
  part = _cfg(str(tmp_path / "b"))
  # Stop mid-cohort 1 (after step 8 of 12), then rerun the same call.
  r1 = train_workflow.train_and_publish(part, str(tmp_path / "b" / "work"),
                              stop_after_steps=8)
  assert r1["stopped"]
  r2 = train_workflow.train_and_publish(part, str(tmp_path / "b" / "work"))
  assert r2["steps"] == 4 and not r2["stopped"]
  reg_a, reg_b = Registry.open(full.registry), Registry.open(part.registry)
  users = sorted(res_full["published"])
  wa, wb = _weights(reg_a, users), _weights(reg_b, users)
  for u in users:
    for t in wa[u].lora_a:
      np.testing.assert_array_equal(wa[u].lora_a[t], wb[u].lora_a[t])
      np.testing.assert_array_equal(wa[u].lora_b[t], wb[u].lora_b[t])
    # One revision each: the resumed run did not publish cohort 0 twice.
    assert len(reg_b.history(u)) == 1
  rev = reg_a.resolve(users[0])
  prov = rev.provenance
  assert prov["data_fingerprint"].startswith("sha256:")
  assert prov["steps"] == 6 and prov["seed"] == 0
  assert prov["evaluation"]["heldout_loss"] > 0
  metrics = {e["metric"] for e in reg_a.evals(users[0])}
  assert metrics == {"heldout_loss", "exact_match"}
  lines = (tmp_path / "a" / "work" / "metrics.jsonl").read_text().splitlines()
  assert any("tokens_per_s" in json.loads(l) for l in lines)


def test_second_run_continues_from_latest_revision(tmp_path):
  c = _cfg(str(tmp_path), steps_per_cohort=3, checkpoint_every=3)
  train_workflow.train_and_publish(c, str(tmp_path / "w1"))
  c.seed = 1  # a new run (new fingerprint) over the same registry
  train_workflow.train_and_publish(c, str(tmp_path / "w2"))
  reg = Registry.open(c.registry)
  rev = reg.resolve("user0000")
  assert rev.revision == 2 and rev.parent == 1
  # A run whose rank differs from the stored adapters is refused instead of
  # silently restarting the users from scratch.
  c.seed, c.lora.rank = 2, c.lora.rank * 2
  with pytest.raises(ValueError, match="continue_from_registry=False"):
    train_workflow.train_and_publish(c, str(tmp_path / "w3"))
  assert len(Registry.open(c.registry).history("user0000")) == 2


def test_base_mismatch_refused_before_training(tmp_path):
  c = _cfg(str(tmp_path), steps_per_cohort=2, checkpoint_every=2)
  train_workflow.train_and_publish(c, str(tmp_path / "w1"))
  other = random_base(RANDOM_VARIANTS["tiny"], seed=7)
  with pytest.raises(BaseMismatchError, match="was trained on base"):
    train_workflow.train_and_publish(c, str(tmp_path / "w2"), base=other)
  reg = Registry.open(c.registry)
  assert len(reg.history("user0000")) == 1
  assert not os.path.exists(tmp_path / "w2" / "checkpoints" / "2")
