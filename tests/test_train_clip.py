"""Per-slot gradient clipping: each slot is clipped by its own norm only.

Slots exceed `clip_norm` by different amounts (10x, 3x, 0.5x), and the
result is compared with an independent float64 numpy oracle of per-slot
global-norm clipping followed by per-slot AdamW. A clip computed over all
slots together (or no clip at all) changes the updates of every slot and
fails both tests. Slots absent from the batch must come back bit-identical,
weights and every optimizer leaf, even when handed a non-zero gradient.

Adam's first step is invariant to the gradient's scale, so clipping is only
visible through moments accumulated at other scales: the tests start from
warm optimizer state or take several steps with changing norms.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.model.base import random_base
from mintjax.train import loss as loss_lib
from mintjax.train import optimizer as opt_lib
from mintjax.train.step import Batch, StepConfig, make_train_step

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
SPEC = AdapterSpec(targets=("q", "v", "down"), max_rank=4, num_slots=6)
CLIP = 0.25
OPT = opt_lib.OptimizerConfig(learning_rate=1e-2, weight_decay=0.1,
                              clip_norm=CLIP)
# Pre-clip norm of slots 1, 2, 3 as multiples of clip_norm; 4 and 5 absent.
RATIOS = {1: 10.0, 2: 3.0, 3: 0.5}


# --- the oracle (numpy, float64, written from the AdamW definition) --------

def _leaves(tree):
  """Flat {path: float64 array [S, ...]} of a {'lora_a': {t: ...}} tree."""
  return {(k, t): np.asarray(x, np.float64)
          for k, sub in tree.items() for t, x in sub.items()}


def oracle_step(params, grads, mu, nu, count, active):
  """Per-slot clip then AdamW with a constant learning rate.

  Args:
    params, grads, mu, nu: {path: [S, ...]} float64.
    count: [S] steps taken so far; active: [S] bool (slot 0 never trains).

  Returns:
    (params, mu, nu, count, pre-clip norms [S]) after one step.
  """
  active = np.asarray(active, bool).copy()
  active[0] = False
  norm = np.sqrt(sum(np.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                     for g in grads.values()))
  new_p, new_mu, new_nu = dict(params), dict(mu), dict(nu)
  new_count = np.asarray(count).copy()
  for s in np.flatnonzero(active):
    factor = min(1.0, OPT.clip_norm / (norm[s] + 1e-6))
    t = new_count[s] + 1
    new_count[s] = t
    for k in params:
      g = grads[k][s] * factor
      m = OPT.b1 * mu[k][s] + (1 - OPT.b1) * g
      v = OPT.b2 * nu[k][s] + (1 - OPT.b2) * g * g
      m_hat, v_hat = m / (1 - OPT.b1 ** t), v / (1 - OPT.b2 ** t)
      p = params[k][s]
      upd = m_hat / (np.sqrt(v_hat) + OPT.eps) + OPT.weight_decay * p
      for tree, val in ((new_p, p - OPT.learning_rate * upd), (new_mu, m),
                        (new_nu, v)):
        tree[k] = tree[k].copy()
        tree[k][s] = val
  return new_p, new_mu, new_nu, new_count, norm


def _tree(flat, like):
  return {k: {t: flat[(k, t)].astype(np.float32) for t in sub}
          for k, sub in like.items()}


def _assert_matches(got, want, absent, where):
  """Active slots close to the oracle; absent slots bit-identical."""
  for k, w in want.items():
    g = np.asarray(got[k])
    for s in range(g.shape[0]):
      if s in absent:
        np.testing.assert_array_equal(g[s], absent[s][k],
                                      err_msg=f"{where} {k} slot {s}")
      else:
        # float32 against float64: absolute slack of 1e-5 of the leaf's
        # scale (the learning-rate step is 1e-2 of it, a wrong clip moves
        # values by a sizeable part of that step).
        np.testing.assert_allclose(g[s], w[s], rtol=2e-4,
                                   atol=1e-5 * np.abs(w).max(),
                                   err_msg=f"{where} {k} slot {s}")


# --- the optimizer alone, three steps ---------------------------------------

def _grads_with_norms(rng, shapes, norms):
  """Random gradients whose slot s has global norm norms[s] exactly."""
  g = {k: rng.standard_normal(shape) for k, shape in shapes.items()}
  cur = np.sqrt(sum(np.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
                    for x in g.values()))
  scale = np.asarray(norms, np.float64) / np.maximum(cur, 1e-30)
  return {k: (x * scale.reshape((-1,) + (1,) * (x.ndim - 1))
              ).astype(np.float32) for k, x in g.items()}


@pytest.mark.parametrize("sweep", ["all", "present"])
def test_apply_updates_clips_each_slot_by_its_own_norm(sweep):
  rng = np.random.default_rng(0)
  bank = bank_lib.bank_from_weights(CFG, SPEC, {
      s: AdapterWeights.random(CFG, SPEC.targets, 4, seed=s, std=0.3)
      for s in range(1, 6)})
  params = opt_lib.trainable_params(jax.device_get(bank))
  shapes = {k: v.shape for k, v in _leaves(params).items()}
  state = opt_lib.init_opt_state(bank)
  p64, mu64 = _leaves(params), _leaves(jax.device_get(state.mu))
  nu64, count = _leaves(jax.device_get(state.nu)), np.zeros(6, np.int64)
  # Each step: pre-clip norm per slot (x clip_norm) and who is present.
  # Slot 4 always gets a large gradient but is never in the batch; slot 2
  # sits out step 1; slot 5 is never present and gets a zero gradient.
  plan = [([0.0, 10.0, 3.0, 0.5, 7.0, 0.0], [0, 1, 1, 1, 0, 0]),
          ([0.0, 0.5, 8.0, 10.0, 7.0, 0.0], [0, 1, 0, 1, 0, 0]),
          ([2.0, 3.0, 0.5, 1.5, 7.0, 0.0], [1, 1, 1, 1, 0, 0])]
  apply = jax.jit(opt_lib.apply_updates, static_argnums=0)
  untouched = {s: {k: np.asarray(v[s]) for k, v in
                   _leaves(params).items()} for s in (0, 4, 5)}
  for i, (ratios, present) in enumerate(plan):
    g32 = _grads_with_norms(rng, shapes, np.asarray(ratios) * CLIP)
    params, state, metrics = apply(
        dataclasses.replace(OPT, slot_sweep=sweep), params,
        _tree(g32, params), state, jnp.asarray(present, bool))
    np.testing.assert_allclose(np.asarray(metrics["grad_norm"]),
                               np.asarray(ratios) * CLIP, rtol=1e-5)
    p64, mu64, nu64, count, _ = oracle_step(
        p64, {k: np.float64(v) for k, v in g32.items()}, mu64, nu64, count,
        present)
    got = jax.device_get(params)
    _assert_matches(_leaves(got), p64, untouched, f"step {i} params")
    zeros = {s: {k: np.zeros(v.shape[1:]) for k, v in p64.items()}
             for s in (0, 4, 5)}
    _assert_matches(_leaves(jax.device_get(state.mu)), mu64, zeros,
                    f"step {i} mu")
    _assert_matches(_leaves(jax.device_get(state.nu)), nu64, zeros,
                    f"step {i} nu")
    np.testing.assert_array_equal(np.asarray(state.count), count)
  assert list(count) == [0, 3, 2, 3, 0, 0]


# --- the compiled train step -------------------------------------------------

@pytest.fixture(scope="module")
def base():
  return random_base(CFG, seed=0)


@jax.jit
def _raw_grads_jit(params, bank, batch):
  def loss(trainable):
    logits_btv, _ = llama.forward(
        params, bank.replace(**trainable), batch.adapter_idx, batch.tokens,
        batch.positions, config=CFG, segment_ids_bt=batch.segment_ids,
        lora_impl="reference")
    return loss_lib.multi_tenant_loss(
        logits_btv, batch.targets, batch.loss_mask, batch.weight,
        batch.adapter_idx, SPEC.num_slots)[0]
  return jax.grad(loss)(opt_lib.trainable_params(bank))


def _raw_grads(params, bank, batch):
  """d loss / d (A, B) of the multi-tenant loss, outside the train step."""
  return _leaves(jax.device_get(_raw_grads_jit(params, bank, batch)))


def _norms(grads):
  return np.sqrt(sum(np.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                     for g in grads.values()))


@pytest.mark.parametrize("sweep", ["all", "present"])
def test_train_step_clips_each_slot_by_its_own_norm(base, sweep):
  rng = np.random.default_rng(1)
  slots = [1, 2, 3, 1, 2, 3, 1, 0]  # slots 4 and 5 are absent
  batch = Batch.from_token_rows(rng.integers(3, 259, (8, 13)), slots)
  # Present slots start PEFT-style (B = 0): the base's output does not
  # depend on A, so a slot's gradient is linear in its A and scaling A sets
  # its pre-clip norm exactly. Absent slots hold trained-looking weights.
  ws = {s: AdapterWeights.random(CFG, SPEC.targets, 4, seed=s, std=0.3)
        for s in range(1, 6)}
  for s in RATIOS:
    ws[s] = AdapterWeights(ws[s].lora_a, {t: np.zeros_like(b) for t, b in
                                          ws[s].lora_b.items()}, 4, 8.0)
  norms = _norms(_raw_grads(base.params, bank_lib.bank_from_weights(
      CFG, SPEC, ws), batch))
  for s, ratio in RATIOS.items():
    c = ratio * CLIP / norms[s]
    ws[s] = AdapterWeights({t: a * c for t, a in ws[s].lora_a.items()},
                           ws[s].lora_b, 4, 8.0)
  bank = bank_lib.bank_from_weights(CFG, SPEC, ws)
  grads = _raw_grads(base.params, bank, batch)
  pre = _norms(grads)
  np.testing.assert_allclose(pre[1:4], [RATIOS[s] * CLIP for s in (1, 2, 3)],
                             rtol=1e-4)
  assert pre[4] == pre[5] == 0.0
  # Warm optimizer state: moments from earlier steps, per-slot counts.
  host = jax.device_get(bank)
  p64 = _leaves(opt_lib.trainable_params(host))
  mu64 = {k: rng.normal(0.0, 0.01, v.shape) for k, v in p64.items()}
  nu64 = {k: rng.uniform(1e-4, 1e-3, v.shape) for k, v in p64.items()}
  count = np.array([0, 4, 2, 7, 3, 5])
  like = opt_lib.trainable_params(host)
  state = opt_lib.SlotOptState(mu=_tree(mu64, like), nu=_tree(nu64, like),
                               count=jnp.asarray(count, jnp.int32))
  mesh = sharding.make_mesh(data=1, fsdp=-1)
  step = make_train_step(CFG, SPEC, dataclasses.replace(OPT, slot_sweep=sweep),
                         mesh, StepConfig(lora_impl="gather"))
  absent = {s: {k: np.asarray(v[s]) for k, v in p64.items()} for s in (0, 4, 5)}
  absent_mu = {s: {k: np.float32(v[s]) for k, v in mu64.items()}
               for s in (0, 4, 5)}
  absent_nu = {s: {k: np.float32(v[s]) for k, v in nu64.items()}
               for s in (0, 4, 5)}
  # float32 copies are what the step starts from; the oracle uses them too.
  mu64 = {k: np.float64(np.float32(v)) for k, v in mu64.items()}
  nu64 = {k: np.float64(np.float32(v)) for k, v in nu64.items()}
  new_bank, new_state, metrics = step(base.params, bank, state, batch)
  np.testing.assert_allclose(np.asarray(metrics["grad_norm"])[1:4],
                             pre[1:4], rtol=1e-4)
  want_p, want_mu, want_nu, want_count, _ = oracle_step(
      p64, grads, mu64, nu64, count, [s in slots for s in range(6)])
  got = jax.device_get((new_bank, new_state))
  _assert_matches(_leaves(opt_lib.trainable_params(got[0])), want_p, absent,
                  "params")
  _assert_matches(_leaves(got[1].mu), want_mu, absent_mu, "mu")
  _assert_matches(_leaves(got[1].nu), want_nu, absent_nu, "nu")
  np.testing.assert_array_equal(np.asarray(got[1].count), want_count)
  assert list(want_count) == [0, 5, 3, 8, 3, 5]
