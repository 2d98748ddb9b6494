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
  with pytest.raises(AdapterError, match="unknown adapter family"):
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
  return Batch.from_token_rows(rng.integers(3, 259, (len(slots), t + 1)),
                               slots)


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
    # Every optimizer leaf (moments of both factors, step count) of the
    # untouched slots is exactly what it was before training.
    jax.tree.map(lambda x, y, k=k: np.testing.assert_array_equal(x[k], y[k]),
                 after_opt, before_opt)
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


# ------------------------------------------------------------ registry


def _dir_bytes(path):
  import os  # pylint: disable=g-import-not-at-top
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(path) for f in fs)


def test_registry_stores_only_the_vectors_and_loads_them_back(tmp_path, base):
  from mintjax.store.registry import Registry  # pylint: disable=g-import-not-at-top
  reg = Registry.open(tmp_path / "reg")
  fp = base.fingerprint
  vspec = dict(targets=list(TARGETS), rank=4, alpha=8.0, variant="vera",
               basis_seed=7)
  reg.create_adapter("v", spec=vspec, base_fingerprint=fp, config=CFG)
  reg.create_adapter("l", spec=dict(targets=list(TARGETS), rank=4, alpha=8.0),
                     base_fingerprint=fp, config=CFG)
  vw = [vera.VeraWeights.random(CFG, TARGETS, 4, basis_seed=7, seed=i,
                                alpha=8.0) for i in range(3)]
  lw = AdapterWeights.random(CFG, TARGETS, 4, alpha=8.0)
  reg.publish("v", vw[0], {"seed": 1})
  reg.publish("l", lw)
  rv, rl = reg.adapter("v"), reg.adapter("l")
  assert rv["array_key"] != rl["array_key"]  # its own shape class
  assert rv["layout"]["variant"] == "vera" and "variant" not in rl["layout"]
  # Bytes on disk per revision. Every publish writes its own write-once
  # shard file (rows + a fixed-size index), so a two-row publish_many minus
  # a one-row publish is exactly one row.
  arrays = tmp_path / "reg" / "arrays"

  def grow(key, items):
    before = _dir_bytes(arrays / key)
    reg.publish_many(items)
    return _dir_bytes(arrays / key) - before

  v_row = (grow(rv["array_key"], [("v", w, {"seed": 1}) for w in vw[1:]]) -
           grow(rv["array_key"], [("v", vw[1], {"seed": 1})]))
  l_row = (grow(rl["array_key"], [("l", lw), ("l", lw)]) -
           grow(rl["array_key"], [("l", lw)]))
  vera_spec = AdapterSpec(targets=TARGETS, max_rank=4, variant="vera")
  assert v_row == vera_spec.stored_bytes(CFG)  # L * (r + d_out) * 4 bytes
  assert l_row == vera_spec.replace(variant="lora").stored_bytes(CFG)
  assert v_row * 9 < l_row
  (rev, got), (_, got_l) = reg.load_many(["v@2", "l"], expect_base=fp)
  assert isinstance(got, vera.VeraWeights) and rev.revision == 2
  assert got.basis_seed == 7 and got.rank == 4 and got.alpha == 8.0
  for t in TARGETS:
    np.testing.assert_array_equal(got.lambda_d[t], vw[1].lambda_d[t])
    np.testing.assert_array_equal(got.lambda_b[t], vw[1].lambda_b[t])
  assert got_l.to_lora(CFG) is got_l
  assert reg.history("v")[-1].provenance["seed"] == 1
  assert reg.verify()["ok"]
  d = reg.diff("v@1", "v@2")  # on the materialised factors
  assert d["q"]["delta"] > 0 and d["q"]["norm_a"] > 0
  assert reg.diff("v@2", "v@2")["down"]["delta"] == 0.0


def test_registry_refuses_vera_weights_that_do_not_match_the_spec(tmp_path):
  from mintjax.store.errors import InvalidAdapterError  # pylint: disable=g-import-not-at-top
  from mintjax.store.registry import Registry  # pylint: disable=g-import-not-at-top
  reg = Registry.open(tmp_path / "reg")
  reg.create_adapter("v", spec=dict(targets=["q", "v"], rank=2,
                                    variant="vera", basis_seed=7),
                     base_fingerprint="sha256:ab", config=CFG)
  good = vera.VeraWeights.random(CFG, ("q", "v"), 2, basis_seed=7)
  bad = {
      "basis_seed 8": vera.VeraWeights.random(CFG, ("q", "v"), 2,
                                              basis_seed=8),
      "rank 3": vera.VeraWeights.random(CFG, ("q", "v"), 3, basis_seed=7),
      "targets": vera.VeraWeights.random(CFG, ("q",), 2, basis_seed=7),
      "must be VeraWeights": AdapterWeights.random(CFG, ("q", "v"), 2),
      "alpha=4.0": vera.VeraWeights.random(CFG, ("q", "v"), 2, basis_seed=7,
                                           alpha=4.0),
      "NaN": vera.VeraWeights(good.lambda_d, dict(
          good.lambda_b, q=np.full((2, 64), np.nan, np.float32)), 2, 7),
  }
  for msg, w in bad.items():
    with pytest.raises(InvalidAdapterError, match=msg):
      reg.publish("v", w)
  with pytest.raises(InvalidAdapterError, match="create it with config="):
    reg.create_adapter("nocfg", spec=dict(targets=["q"], rank=2,
                                          variant="vera"),
                       base_fingerprint="sha256:ab")
    reg.publish("nocfg", vera.VeraWeights.random(CFG, ("q",), 2))
  with pytest.raises(InvalidAdapterError, match="only meaningful"):
    reg.create_adapter("x", spec=dict(targets=["q"], rank=2, basis_seed=3),
                       base_fingerprint="sha256:ab")
  assert reg.history("v") == [] and reg.history("nocfg") == []
  assert reg.publish("v", good).revision == 1


# ------------------------------------------------------------ serving


def test_engine_serves_base_lora_and_vera_mixed_like_alone(tmp_path):
  from mintjax.serve.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from mintjax.serve.residency import weights_nbytes  # pylint: disable=g-import-not-at-top
  from mintjax.store.registry import Registry  # pylint: disable=g-import-not-at-top
  base = random_base(CFG, seed=0, std=0.3)  # peaked logits: no greedy ties
  reg = Registry.open(tmp_path / "reg")
  names = []
  for i in range(6):
    vspec = dict(targets=["q", "v"], rank=2 + i % 3, variant="vera",
                 basis_seed=i % 2)
    reg.create_adapter(f"v{i}", spec=vspec, base_fingerprint=base.fingerprint,
                       config=CFG)
    reg.publish(f"v{i}", vera.VeraWeights.random(
        CFG, ("q", "v"), 2 + i % 3, basis_seed=i % 2, seed=i, std=20.0))
    reg.create_adapter(f"l{i}", spec=dict(targets=["q", "v"], rank=4),
                       base_fingerprint=base.fingerprint)
    reg.publish(f"l{i}", AdapterWeights.random(CFG, ("q", "v"), 4, seed=50 + i,
                                               std=0.3))
    names += [f"v{i}", f"l{i}"]
  eng = Engine(base, reg, EngineConfig(
      num_slots=3, max_batch=4, max_len=32, steps_per_call=4,
      prefill_batch=2, targets=("q", "v"), max_rank=4))
  rng = np.random.default_rng(0)
  reqs = [dict(prompt=[int(t) for t in rng.integers(3, 259, 5 + i % 7)],
               adapter=None if i % 5 == 0 else names[i % len(names)],
               max_new_tokens=5, ignore_eos=True) for i in range(24)]
  batched = eng.generate(reqs)
  assert eng.stats()["residency"]["device"]["evictions"] > 0
  for req, got in zip(reqs, batched):
    alone = eng.generate([req])[0]
    assert got.error is None and got.tokens == alone.tokens, req
  # VeRA adapters really change the output (vs the base on the same prompt).
  p = reqs[1]["prompt"]
  v_out = eng.generate([dict(prompt=p, adapter="v0", max_new_tokens=5,
                             ignore_eos=True)])[0].tokens
  b_out = eng.generate([dict(prompt=p, max_new_tokens=5,
                             ignore_eos=True)])[0].tokens
  assert v_out != b_out
  assert eng.stats()["backend_compiles_since_warmup"] == 0
  # ...and equal the plain model run on the jit-materialised VeRA bank.
  w0 = reg.load("v0")[1]
  vbank = vera.vera_bank_from_weights(CFG, AdapterSpec(
      targets=("q", "v"), max_rank=4, num_slots=2, variant="vera",
      basis_seed=0), {1: w0}).materialize()
  seq = list(p)
  for _ in range(5):
    logits = llama.jit_forward(base.params, vbank, np.array([1], np.int32),
                               np.array([seq], np.int32), config=CFG)
    seq.append(int(np.argmax(logits[0, -1])))
  assert seq[len(p):] == v_out
  # The host cache holds (and counts) the stored vectors, not the factors.
  cached = eng.residency.host.get("v0@1", count=False)
  assert isinstance(cached, vera.VeraWeights)
  assert weights_nbytes(cached) == AdapterSpec(
      targets=("q", "v"), max_rank=2, variant="vera").stored_bytes(CFG)


# ------------------------------------------------------- the training run


def test_training_run_trains_resumes_and_publishes_vera_vectors(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  from configs import smollm2_personal  # pylint: disable=g-import-not-at-top
  from mintjax.apps.personal_data import write_personal_data  # pylint: disable=g-import-not-at-top
  from mintjax.store.registry import Registry  # pylint: disable=g-import-not-at-top
  from mintjax.apps import train_workflow  # pylint: disable=g-import-not-at-top
  paths = write_personal_data(str(tmp_path / "data"), num_users=4, seed=3)
  c = smollm2_personal.get_config("tiny")
  c.train_data = os.path.dirname(paths["train"])
  c.heldout_data = os.path.dirname(paths["heldout"])
  c.registry = str(tmp_path / "registry")
  c.num_slots, c.batch_size, c.steps_per_cohort = 4, 8, 4
  c.checkpoint_every, c.log_every, c.lora_impl = 2, 2, "gather"
  c.lora.variant, c.lora.basis_seed, c.lora.rank = "vera", 3, 4
  c.optimizer.learning_rate = 1e-2
  work = str(tmp_path / "work")
  # Killed mid-cohort 1, then resumed from the VeraBank checkpoint.
  assert train_workflow.train_and_publish(c, work,
                                          stop_after_steps=6)["stopped"]
  res = train_workflow.train_and_publish(c, work)
  assert res["steps"] == 2 and list(res["published"]) == ["user0003"]
  reg = Registry.open(c.registry)
  users = sorted(a["id"] for a in reg.list_adapters())
  assert len(users) == 4
  for u in users:
    rec = reg.adapter(u)
    assert rec["spec"]["variant"] == "vera" and rec["spec"]["basis_seed"] == 3
    rev, w = reg.load(u)
    assert isinstance(w, vera.VeraWeights) and w.basis_seed == 3
    assert np.abs(w.lambda_b["q"]).max() > 0  # trained away from the init
    assert rev.provenance["evaluation"]["heldout_loss"] > 0
    assert len(reg.history(u)) == 1
