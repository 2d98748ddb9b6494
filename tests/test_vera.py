"""Tests of the VeRA adapter variant end to end: spec, basis, materialisation,
kernels, the train step (per-slot isolation), the registry and the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters import vera
from mintjax.adapters.spec import AdapterError, AdapterSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.model.base import random_base
from mintjax.train import optimizer as opt_lib
from mintjax.train.step import Batch, StepConfig, make_train_step

CFG = ModelConfig(architecture="llama", vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
TARGETS = ("q", "v", "down")
VSPEC = AdapterSpec(targets=TARGETS, max_rank=4, num_slots=6, variant="vera",
                    basis_seed=7)


@pytest.fixture(scope="module")
def base():
  return random_base(CFG, seed=0)


# --------------------------------------------------------- spec and basis


def test_spec_counts_true_per_user_size_for_both_variants():
  lora = VSPEC.replace(variant="lora")
  l = CFG.num_layers
  shapes = [CFG.projection_shape(t) for t in TARGETS]
  assert lora.params_per_adapter(CFG) == l * sum(4 * (i + o) for i, o in shapes)
  assert VSPEC.params_per_adapter(CFG) == l * sum(4 + o for _, o in shapes)
  assert VSPEC.params_per_adapter(CFG, rank=1) == l * sum(1 + o
                                                         for _, o in shapes)
  assert VSPEC.stored_bytes(CFG) == 4 * VSPEC.params_per_adapter(CFG)
  assert VSPEC.replace(dtype="bfloat16").stored_bytes(CFG) == (
      2 * VSPEC.params_per_adapter(CFG))
  w = vera.VeraWeights.init(CFG, TARGETS, rank=4, basis_seed=7)
  assert w.num_params() == VSPEC.params_per_adapter(CFG)
  assert w.nbytes == VSPEC.stored_bytes(CFG)
  with pytest.raises(AdapterError, match="basis_seed"):
    AdapterSpec(variant="vera", basis_seed=-1)
  with pytest.raises(AdapterError, match="supported"):
    AdapterSpec(variant="dora")


def test_basis_is_deterministic_and_prefix_stable_in_rank():
  a8, b8 = vera.basis_factors(3, "q", 2, 64, 64, 8)
  vera.basis_factors.cache_clear()
  a3, b3 = vera.basis_factors(3, "q", 2, 64, 64, 3)
  np.testing.assert_array_equal(a3, a8[..., :3])
  np.testing.assert_array_equal(b3, b8[:, :3, :])
  a_other, _ = vera.basis_factors(4, "q", 2, 64, 64, 3)
  assert not np.allclose(a_other, a3)
  a_v, _ = vera.basis_factors(3, "v", 2, 64, 32, 3)
  assert not np.allclose(a_v, a3)
  # Kaiming-uniform bounds: U(+-1/sqrt(d_in)) and U(+-1/sqrt(d_out)).
  assert np.abs(a8).max() <= 1 / 8 and np.abs(a8).max() > 0.9 / 8
  assert np.abs(b8).max() <= 1 / 8


def test_fresh_adapter_is_the_base_and_materialises_to_lora():
  w = vera.VeraWeights.init(CFG, TARGETS, rank=2, basis_seed=7)
  lora = w.to_lora(CFG)
  assert isinstance(lora, AdapterWeights) and lora.rank == 2
  for t in TARGETS:
    assert np.all(lora.lora_b[t] == 0)  # lambda_b = 0: exactly the base.
    np.testing.assert_allclose(lora.lora_a[t], 0.1 * vera.basis_factors(
        7, t, 2, *CFG.projection_shape(t), 2)[0], rtol=1e-6)
  # The materialised delta is A diag(lambda_d) B diag(lambda_b).
  r = vera.VeraWeights.random(CFG, TARGETS, rank=3, basis_seed=7, seed=1)
  m = r.to_lora(CFG)
  a, b = vera.basis_factors(7, "v", 2, *CFG.projection_shape("v"), 3)
  want = np.einsum("ir,r,ro,o->io", a[1], r.lambda_d["v"][1], b[1],
                   r.lambda_b["v"][1])
  np.testing.assert_allclose(m.lora_a["v"][1] @ m.lora_b["v"][1], want,
                             rtol=1e-5, atol=1e-7)
  assert AdapterWeights.random(CFG, TARGETS, 2).to_lora(CFG) is not None


def test_bad_vectors_are_refused_with_teaching_errors():
  w = vera.VeraWeights.random(CFG, TARGETS, rank=2, basis_seed=7)
  bad_shape = vera.VeraWeights(dict(w.lambda_d, q=np.ones((2, 3))),
                               w.lambda_b, rank=2, basis_seed=7)
  with pytest.raises(AdapterError, match=r"lambda_d\['q'\].*expected \(2, 2\)"):
    bad_shape.validate(CFG)
  nan = vera.VeraWeights(w.lambda_d, dict(w.lambda_b, v=np.full((2, 32),
                                                                np.nan)),
                         rank=2, basis_seed=7)
  with pytest.raises(AdapterError, match="NaN"):
    nan.to_lora(CFG)
  with pytest.raises(AdapterError, match="basis_seed 7.*seed 8"):
    w.validate(CFG, VSPEC.replace(basis_seed=8))
  with pytest.raises(AdapterError, match="max_rank"):
    vera.VeraWeights.random(CFG, TARGETS, rank=5, basis_seed=7).validate(
        CFG, VSPEC)


# ------------------------------------------------------ bank and kernels


def _vera_bank(seed=0):
  ws = {s: vera.VeraWeights.random(CFG, TARGETS, rank=4 if s % 2 else 2,
                                   basis_seed=7, seed=seed + s)
        for s in range(1, 6)}
  return ws, vera.vera_bank_from_weights(CFG, VSPEC, ws)


def test_materialised_bank_equals_per_adapter_materialisation():
  ws, vbank = _vera_bank()
  got = jax.jit(vera.VeraBank.materialize)(vbank)
  want = bank_lib.bank_from_weights(CFG, VSPEC, ws)  # pad_weights -> to_lora
  for t in TARGETS:
    np.testing.assert_allclose(got.lora_a[t], want.lora_a[t], rtol=1e-6)
    np.testing.assert_allclose(got.lora_b[t], want.lora_b[t], rtol=1e-6)
  np.testing.assert_array_equal(got.scale, want.scale)
  np.testing.assert_array_equal(got.rank, want.rank)
  back = vera.read_vera_slot(vbank, 2, basis_seed=7)
  np.testing.assert_array_equal(back.lambda_d["q"], ws[2].lambda_d["q"])
  np.testing.assert_array_equal(back.lambda_b["down"], ws[2].lambda_b["down"])
  assert back.rank == 2 and back.scale == ws[2].scale


def test_kernel_path_and_xla_path_agree_on_a_materialised_vera_bank(base):
  import pallas_kernels.ops  # noqa: F401  (registers the interpret kernels)
  _, vbank = _vera_bank()
  bank = vbank.materialize()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 259, (4, 8)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (4, 8))
  idx = jnp.asarray([1, 0, 4, 2], jnp.int32)
  out = {}
  for impl in ("reference", "gather", "pallas_sgmv_interpret",
               "pallas_gpu_interpret"):
    out[impl], _ = llama.forward(base.params, bank, idx, tokens, pos,
                                 config=CFG, lora_impl=impl)
  base_logits, _ = llama.forward(base.params, bank, jnp.zeros_like(idx),
                                 tokens, pos, config=CFG, lora_impl="gather")
  assert float(jnp.abs(out["gather"] - base_logits)[0].max()) > 1e-3
  for impl in ("gather", "pallas_sgmv_interpret", "pallas_gpu_interpret"):
    np.testing.assert_allclose(out[impl], out["reference"], rtol=2e-5,
                               atol=2e-5, err_msg=impl)


# ------------------------------------------------------------ training


def _batch(rng, slots, t=12):
  b = len(slots)
  tokens = rng.integers(3, 259, (b, t + 1))
  mask = np.zeros((b, t), np.float32)
  mask[:, t // 2:] = 1.0
  return Batch(tokens=jnp.asarray(tokens[:, :-1], jnp.int32),
               targets=jnp.asarray(tokens[:, 1:], jnp.int32),
               loss_mask=jnp.asarray(mask),
               positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32),
                                          (b, t)),
               segment_ids=jnp.ones((b, t), jnp.int32),
               adapter_idx=jnp.asarray(slots, jnp.int32),
               weight=jnp.ones((b,), jnp.float32))


def _host(tree):
  return jax.tree.map(np.array, tree)


def test_vera_step_trains_vectors_only_and_isolates_slots(base):
  opt = opt_lib.OptimizerConfig(learning_rate=2e-2, weight_decay=0.1,
                                clip_norm=1.0, warmup_steps=2,
                                schedule="cosine", decay_steps=50)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  step = make_train_step(CFG, VSPEC, opt, mesh, StepConfig(lora_impl="gather"))
  # Fresh adapters per the paper (lambda_b = 0): training must move them.
  ws = {s: vera.VeraWeights.init(CFG, TARGETS, rank=4 if s % 2 else 2,
                                 basis_seed=7) for s in range(1, 6)}
  vbank = vera.vera_bank_from_weights(CFG, VSPEC, ws)
  state = opt_lib.init_opt_state(vbank)
  assert set(state.mu) == {"lambda_d", "lambda_b"}
  before_bank, before_opt = _host(vbank), _host(state)
  rng = np.random.default_rng(0)
  fixed = _batch(np.random.default_rng(5), [1, 2, 4, 5, 1, 2, 4, 5])
  losses = []
  for i in range(30):
    # Slot 3 never appears; slot 0 appears as base rows.
    batch = fixed if i % 2 else _batch(rng, rng.choice([0, 1, 2, 4, 5], 8))
    vbank, state, m = step(base.params, vbank, state, batch)
    if i % 2:
      losses.append(float(m["loss"]))
  after_bank, after_opt = _host(vbank), _host(state)
  for k in (3, 0):
    for t in TARGETS:
      np.testing.assert_array_equal(after_bank.lambda_d[t][k],
                                    before_bank.lambda_d[t][k])
      np.testing.assert_array_equal(after_bank.lambda_b[t][k],
                                    before_bank.lambda_b[t][k])
      np.testing.assert_array_equal(after_opt.mu["lambda_d"][t][k], 0.0)
      np.testing.assert_array_equal(after_opt.nu["lambda_b"][t][k], 0.0)
    assert after_opt.count[k] == 0
  assert 0 < after_opt.count[1] <= 30
  assert not np.array_equal(after_bank.lambda_b["q"][1],
                            before_bank.lambda_b["q"][1])
  assert not np.array_equal(after_bank.lambda_d["q"][1],
                            before_bank.lambda_d["q"][1])
  # Rank padding of lambda_d stays exactly zero (slot 2 has rank 2 of 4).
  np.testing.assert_array_equal(after_bank.lambda_d["v"][2][:, 2:], 0.0)
  # The frozen basis comes back bit-identical.
  for t in TARGETS:
    np.testing.assert_array_equal(after_bank.basis.a[t],
                                  before_bank.basis.a[t])
    np.testing.assert_array_equal(after_bank.basis.b[t],
                                  before_bank.basis.b[t])
  assert losses[-1] < losses[0], losses
