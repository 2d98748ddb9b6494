"""Slot eviction in the Tinker trainer: more clients than bank slots.

A real `Trainer` (tiny random base, real registry on disk, real compiled
forward-backward and Adam steps) with 2 slots and 3 clients: a client
evicted between its forward-backward and its optim step comes back
bit-identical to a twin that never left, and a client put into an evicted
client's slot starts from a clean optimizer state. Marked `tinker` (it
compiles the train steps): `make test-tinker`.
"""

import concurrent.futures

import jax
import numpy as np
import pytest

from mintjax.adapters.spec import ALL_TARGETS
from mintjax.apps.tinker_service.trainer import Trainer, TrainerConfig
from mintjax.model.base import random_base
from mintjax.model.sources import RANDOM_VARIANTS
from mintjax.store.registry import Registry
from mintjax.train.cohort import init_adapter

pytestmark = pytest.mark.tinker


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  d = tmp_path_factory.mktemp("slots")
  base = random_base(RANDOM_VARIANTS["tiny"], seed=0)
  registry = Registry.open(str(d / "registry"), create=True)
  tr = Trainer(base, registry, base_name="tiny", state_dir=str(d / "state"),
               config=TrainerConfig(num_slots=2, max_rank=4, max_len=16,
                                    max_rows=8, batch_window_s=0.0,
                                    active_window_s=0.0))
  yield tr
  tr.close()
  registry.close()


def _rows(seed, n=2, t=12):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(3, 250, t + 1).astype(np.int32)
    z = np.zeros(t, np.float32)
    out.append(dict(tokens=ids[:-1], targets=ids[1:], weights=z + 1,
                    advantages=z, sampling_logprobs=z, clip_low=z + 0.8,
                    clip_high=z + 1.2, kind=0, forward_only=False))
  return out


def _create(tr, name):
  tr.create_tenant(name, rank=4, targets=ALL_TARGETS, session_id="s"
                   ).result(60)
  # Every client starts from the same weights (the initialiser seeds by
  # adapter id), so their steps can be compared bit for bit.
  same = init_adapter(tr.base.config, ALL_TARGETS, 4, tr.config.alpha,
                      "shared", 7)
  tr.submit(name, "init", (same, None)).result(60)


def _fb(tr, name, rows, forward_only=False):
  rows = [dict(r, forward_only=forward_only) for r in rows]
  return tr.submit(name, "fwdbwd", {"rows": rows}).result(120)


def _opt(tr, name):
  return tr.submit(name, "optim", {"learning_rate": 1e-2,
                                   "grad_clip_norm": 1.0}).result(120)


def _slot_host(tr, name):
  """(weights, mu, nu, count, grads) of a resident client's slot."""
  s = tr.tenants[name].slot
  pick = lambda tree: jax.tree.map(lambda x: np.asarray(x[s]),
                                   jax.device_get(tree))
  return (pick(tr.bank.lora_a), pick(tr.bank.lora_b),
          pick(tr.opt.mu), pick(tr.opt.nu), int(tr.opt.count[s]),
          pick(tr.grads))


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def test_evicted_mid_step_client_resumes_bit_identical(trainer):
  tr = trainer
  data, data_x = _rows(1), _rows(2)
  _create(tr, "ref")
  _create(tr, "ev")
  for name in ("ref", "ev"):
    _fb(tr, name, data)
  for name in ("ref", "ev"):
    _opt(tr, name)
  after_first_step = _slot_host(tr, "ref")
  # Both take a forward-backward: gradients pending in their slots. 'ref'
  # is used last, so 'ev' is the least recently used.
  _fb(tr, "ev", data)
  _fb(tr, "ref", data)
  before = tr.stats().get("evictions", 0)
  # A third client needs a slot: 'ev' is evicted with its pending gradient
  # and 'x' gets its slot.
  ev_slot = tr.tenants["ev"].slot
  _create(tr, "x")
  assert tr.stats()["evictions"] == before + 1
  assert tr.tenants["ev"].slot is None and tr.tenants["x"].slot == ev_slot
  rev = tr.registry.resolve(tr.tenants["ev"].saved_ref)
  assert rev.provenance["tinker_kind"] == "evicted"
  # 'x' takes its first step in 'ev's old slot: exactly 'ref's first step
  # (same initial weights, same data), so nothing of 'ev' leaked into it.
  _fb(tr, "x", data)
  _opt(tr, "x")
  _assert_same(_slot_host(tr, "x"), after_first_step)
  # 'ref' steps; then 'ev' comes back (evicting 'x', now the LRU client)
  # and applies its pending gradient: the same step 'ref' took.
  _opt(tr, "ref")
  out = _opt(tr, "ev")
  assert tr.tenants["x"].slot is None and tr.stats()["reloads"] >= 1
  assert out["metrics"]["optim_step:sum"] == 2.0
  _assert_same(_slot_host(tr, "ev"), _slot_host(tr, "ref"))
  lp_ref = _fb(tr, "ref", data_x, forward_only=True)["logprobs"]
  lp_ev = _fb(tr, "ev", data_x, forward_only=True)["logprobs"]
  _assert_same(lp_ref, lp_ev)


def test_more_clients_than_slots_train_concurrently(trainer):
  tr = trainer
  names = [f"c{i}" for i in range(4)]
  for n in names:
    _create(tr, n)
  data = _rows(3)

  def loop(name):
    losses = []
    for _ in range(3):
      losses.append(_fb(tr, name, data)["loss_sum"])
      _opt(tr, name)
    return losses
  with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
    curves = list(pool.map(loop, names))
  # Same start, same data: every client's curve is the same however the
  # four were interleaved through the two slots (a row's place in a batch
  # may change the last bits), and it goes down.
  for c in curves[1:]:
    np.testing.assert_allclose(c, curves[0], rtol=1e-5)
  assert curves[0][-1] < curves[0][0]
