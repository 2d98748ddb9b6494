"""Foundation: config, adapter bank, gather-LoRA formulations, decoder, KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mintjax.adapters import bank as bank_lib
from mintjax.adapters import lora_op
from mintjax.adapters.spec import AdapterError, AdapterSpec, AdapterWeights
from mintjax.config import ConfigError, ModelConfig, RopeScaling
from mintjax.model import llama
from mintjax.model.kv_cache import init_cache

TINY = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64,
                   intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16)
XLA_IMPLS = ("gather", "ragged", "onehot")


def _random_bank_tensors(rng, num_slots, d_in, d_out, ranks, dtype):
  """A bank slice with heterogeneous true ranks, zero padded; slot 0 null."""
  max_rank = max(ranks)
  a = np.zeros((num_slots, d_in, max_rank), np.float32)
  b = np.zeros((num_slots, max_rank, d_out), np.float32)
  scale = np.zeros((num_slots,), np.float32)
  for s in range(1, num_slots):
    r = ranks[s % len(ranks)]
    a[s, :, :r] = rng.standard_normal((d_in, r))
    b[s, :r, :] = rng.standard_normal((r, d_out))
    scale[s] = 2.0 / r
  return (jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.asarray(scale))


@pytest.mark.parametrize("impl", XLA_IMPLS)
@pytest.mark.parametrize(
    "num_slots,ranks,batch,length",
    [(4, (1,), 3, 5), (9, (1, 2, 7, 16, 64), 8, 3), (33, (8, 3), 16, 1),
     (2, (64,), 5, 7)])
def test_formulations_match_reference_f32(impl, num_slots, ranks, batch,
                                          length):
  rng = np.random.default_rng(num_slots * 100 + batch)
  d_in, d_out = 24, 40
  a, b, scale = _random_bank_tensors(rng, num_slots, d_in, d_out, ranks,
                                     jnp.float32)
  x = jnp.asarray(rng.standard_normal((batch, length, d_in)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, num_slots, batch), jnp.int32)
  idx = idx.at[0].set(0)  # always include the null slot
  want = lora_op.reference(x, a, b, scale, idx)
  got = jax.jit(lambda *args: lora_op.lora_delta(*args, impl=impl))(
      x, a, b, scale, idx)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(got[0], 0.0)  # slot 0 contributes nothing


@pytest.mark.parametrize("impl", XLA_IMPLS)
def test_formulations_match_reference_bf16(impl):
  rng = np.random.default_rng(7)
  a, b, scale = _random_bank_tensors(rng, 6, 32, 16, (4, 8), jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((4, 6, 32)), jnp.bfloat16)
  idx = jnp.array([0, 3, 5, 3], jnp.int32)
  want = lora_op.reference(x, a, b, scale, idx).astype(jnp.float32)
  got = lora_op.lora_delta(x, a, b, scale, idx, impl=impl)
  assert got.dtype == jnp.bfloat16
  # bf16 has an 8-bit mantissa; intermediates are rounded once to bf16.
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=3e-2,
                             atol=3e-2 * float(jnp.abs(want).max()))


def test_unknown_impl_is_a_clear_error():
  x = jnp.zeros((1, 1, 4))
  with pytest.raises(ValueError, match="available"):
    lora_op.lora_delta(x, jnp.zeros((2, 4, 1)), jnp.zeros((2, 1, 4)),
                       jnp.zeros(2), jnp.zeros(1, jnp.int32), impl="nope")


def test_auto_never_picks_interpret_or_reference_on_cpu():
  assert lora_op.select_impl("cpu", 64, 64, 16) in XLA_IMPLS


def test_bank_write_read_round_trip_and_padding():
  spec = AdapterSpec(targets=("q", "v", "down"), max_rank=8, num_slots=4)
  bank = bank_lib.init_bank(TINY, spec)
  w = AdapterWeights.random(TINY, ("q", "down"), rank=3, alpha=6.0, seed=1)
  bank = bank_lib.write_slot(bank, 2, w, TINY, spec)
  back = bank_lib.read_slot(bank, 2)
  assert back.rank == 3 and back.scale == pytest.approx(2.0)
  for t in ("q", "down"):
    np.testing.assert_array_equal(back.lora_a[t], w.lora_a[t])
    np.testing.assert_array_equal(back.lora_b[t], w.lora_b[t])
  np.testing.assert_array_equal(back.lora_a["v"], 0.0)  # absent target
  np.testing.assert_array_equal(bank.lora_a["q"][2, ..., 3:], 0.0)
  for s in (0, 1, 3):
    assert float(jnp.abs(bank.lora_a["q"][s]).max()) == 0.0
  bank = bank_lib.write_slot(bank, 2, None, TINY, spec)
  assert int(bank.rank[2]) == 0 and float(jnp.abs(bank.lora_b["q"]).max()) == 0


def test_bank_writes_do_not_recompile():
  spec = AdapterSpec(targets=("q", "v"), max_rank=4, num_slots=5)
  bank = bank_lib.init_bank(TINY, spec)
  before = bank_lib._write_slot._cache_size()
  for slot in (1, 2, 3, 4, 1):
    w = AdapterWeights.random(TINY, ("q", "v"), rank=1 + slot % 4, seed=slot)
    bank = bank_lib.write_slot(bank, slot, w, TINY, spec)
  assert bank_lib._write_slot._cache_size() - before <= 1


@pytest.mark.parametrize("case,match", [
    (dict(slot=0), "null adapter"),
    (dict(slot=9), "not writable"),
    (dict(rank=16), "exceeds the bank's max_rank"),
    (dict(targets=("q", "gate")), "not in the bank's targets"),
    (dict(nan=True), "NaN or Inf"),
    (dict(bad_shape=True), "has shape"),
])
def test_bad_slot_writes_are_refused_and_bank_unchanged(case, match):
  spec = AdapterSpec(targets=("q", "v"), max_rank=8, num_slots=4)
  good = AdapterWeights.random(TINY, ("q", "v"), rank=2, seed=3)
  bank = bank_lib.write_slot(bank_lib.init_bank(TINY, spec), 1, good, TINY,
                             spec)
  snapshot = jax.tree.map(np.asarray, bank)
  w = AdapterWeights.random(TINY, case.get("targets", ("q", "v")),
                            rank=case.get("rank", 2), seed=4)
  if case.get("nan"):
    w.lora_a["q"][0, 0, 0] = np.nan
  if case.get("bad_shape"):
    w = AdapterWeights({"q": w.lora_a["q"][:, :-1]}, {"q": w.lora_b["q"]},
                       rank=2, alpha=2.0)
  with pytest.raises(AdapterError, match=match):
    bank_lib.write_slot(bank, case.get("slot", 2), w, TINY, spec)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, bank),
               snapshot)


def test_spec_and_config_validation():
  with pytest.raises(AdapterError, match="unknown target"):
    AdapterSpec(targets=("q", "qkv"))
  with pytest.raises(AdapterError, match="null adapter"):
    AdapterSpec(num_slots=1)
  with pytest.raises(ConfigError, match="supported: llama, mistral, qwen2"):
    TINY.replace(architecture="gpt2")
  with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
    TINY.replace(num_kv_heads=3)


def test_hf_config_styles_agree():
  common = dict(architectures=["LlamaForCausalLM"], vocab_size=128,
                hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=64)
  v4 = ModelConfig.from_hf_config(dict(
      common, rope_theta=5e5, rope_scaling=dict(scaling, rope_type="llama3")))
  v4_type = ModelConfig.from_hf_config(dict(
      common, rope_theta=5e5, rope_scaling=dict(scaling, type="llama3")))
  v5 = ModelConfig.from_hf_config(dict(
      common, rope_parameters=dict(scaling, rope_type="llama3",
                                   rope_theta=5e5)))
  assert v4 == v4_type == v5
  assert v5.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
  with pytest.raises(ConfigError, match="unsupported RoPE scaling"):
    ModelConfig.from_hf_config(
        dict(common, rope_scaling=dict(type="longrope")))
  with pytest.raises(ConfigError, match="missing required key"):
    ModelConfig.from_hf_config({"architectures": ["LlamaForCausalLM"]})


def _tiny_model_and_bank(config=TINY, num_slots=4):
  params = llama.init_params(config, seed=0)
  spec = AdapterSpec(targets=("q", "k", "v", "o", "gate", "up", "down"),
                     max_rank=8, num_slots=num_slots)
  bank = bank_lib.bank_from_weights(config, spec, {
      1: AdapterWeights.random(config, ("q", "v"), rank=4, seed=1),
      2: AdapterWeights.random(config, spec.targets, rank=8, seed=2,
                               std=0.05)})
  return params, bank


@pytest.mark.parametrize("impl", XLA_IMPLS)
def test_model_impls_agree_and_base_rows_equal_plain_model(impl):
  params, bank = _tiny_model_and_bank()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (3, 9)),
                       jnp.int32)
  idx = jnp.array([0, 1, 2], jnp.int32)
  ref = llama.jit_forward(params, bank, idx, tokens, config=TINY,
                          lora_impl="reference")
  got = llama.jit_forward(params, bank, idx, tokens, config=TINY,
                          lora_impl=impl)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  plain = llama.jit_forward(params, None, None, tokens, config=TINY)
  np.testing.assert_allclose(got[0], plain[0], rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(got[2] - plain[2]).max()) > 1e-3  # adapters act


def test_kv_cache_decode_equals_full_forward():
  params, bank = _tiny_model_and_bank()
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 128, (3, 10)), jnp.int32)
  idx = jnp.array([2, 0, 1], jnp.int32)
  full = llama.jit_forward(params, bank, idx, tokens, config=TINY)
  step = jax.jit(lambda c, tok, pos: llama.forward(
      params, bank, idx, tok, pos, config=TINY, cache=c), donate_argnums=0)
  cache = init_cache(TINY, batch=3, max_len=16)
  logits, cache = step(cache, tokens[:, :6],
                       jnp.broadcast_to(jnp.arange(6), (3, 6)))
  np.testing.assert_allclose(logits, full[:, :6], rtol=1e-5, atol=1e-5)
  for t in range(6, 10):
    logits, cache = step(cache, tokens[:, t:t + 1], jnp.full((3, 1), t))
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5,
                               atol=1e-5)


def test_packed_segments_equal_separate_sequences():
  params, bank = _tiny_model_and_bank()
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.integers(0, 128, (1, 5)), jnp.int32)
  b = jnp.asarray(rng.integers(0, 128, (1, 4)), jnp.int32)
  packed = jnp.concatenate([a, b], axis=1)
  positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
  segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 2]])
  idx = jnp.array([1], jnp.int32)
  logits, _ = llama.forward(params, bank, idx, packed, positions, config=TINY,
                            segment_ids_bt=segments)
  la = llama.jit_forward(params, bank, idx, a, config=TINY)
  lb = llama.jit_forward(params, bank, idx, b, config=TINY)
  np.testing.assert_allclose(logits[:, :5], la, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:], lb, rtol=1e-5, atol=1e-5)


def test_bf16_forward_close_to_f32():
  cfg16 = TINY.replace(dtype="bfloat16")
  params, bank = _tiny_model_and_bank()
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 7)))
  idx = jnp.array([2, 0], jnp.int32)
  ref = llama.jit_forward(params, bank, idx, tokens, config=TINY)
  got = llama.jit_forward(params16, bank, idx, tokens, config=cfg16)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, atol=0.05 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("impl", ["reference", "gather", "ragged", "onehot"])
def test_traced_out_of_range_slot_reads_the_null_adapter_not_a_tenant(impl):
  # Inside jit the op cannot raise on a bad index; it must never be clamped
  # onto another tenant's slot (7 or -1 with 3 slots used to read slot 2).
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(4, 2, 8)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(3, 8, 2)), jnp.float32).at[0].set(0)
  b = jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32).at[0].set(0)
  scale = jnp.ones((3,), jnp.float32)
  idx = jnp.asarray([7, -1, 2, 3], jnp.int32)
  y = jax.jit(lambda i: lora_op.lora_delta(x, a, b, scale, i, impl))(idx)
  y = np.asarray(y)
  np.testing.assert_array_equal(y[[0, 1, 3]], 0.0)
  assert np.abs(y[2]).max() > 0
