"""Sharding: golden PartitionSpecs and sharded == unsharded on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mintjax import sharding
from mintjax.adapters import bank as bank_lib
from mintjax.adapters.spec import AdapterSpec, AdapterWeights
from mintjax.config import ModelConfig
from mintjax.model import llama
from mintjax.model.kv_cache import cache_logical_axes, cache_shapes, init_cache

# Widths divisible by 2 so every rule applies on a (2, 2, 2) mesh.
CFG = ModelConfig(architecture="qwen2", vocab_size=256, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, attention_bias=True,
                  tie_word_embeddings=False)
SPEC = AdapterSpec(targets=("q", "v", "o", "down"), max_rank=4, num_slots=4)

GOLDEN_PARAMS = {
    "['embed']": P("tensor", "fsdp"),
    "['final_norm']": P(None),
    "['layers']['attn_norm']": P(None, None),
    "['layers']['down']": P(None, "tensor", "fsdp"),
    "['layers']['gate']": P(None, "fsdp", "tensor"),
    "['layers']['k']": P(None, "fsdp", "tensor"),
    "['layers']['k_bias']": P(None, "tensor"),
    "['layers']['mlp_norm']": P(None, None),
    "['layers']['o']": P(None, "tensor", "fsdp"),
    "['layers']['q']": P(None, "fsdp", "tensor"),
    "['layers']['q_bias']": P(None, "tensor"),
    "['layers']['up']": P(None, "fsdp", "tensor"),
    "['layers']['v']": P(None, "fsdp", "tensor"),
    "['layers']['v_bias']": P(None, "tensor"),
    "['lm_head']": P("fsdp", "tensor"),
}
GOLDEN_BANK = {
    ".lora_a['down']": P(None, None, "tensor", None),
    ".lora_a['o']": P(None, None, "tensor", None),
    ".lora_a['q']": P(None, None, "fsdp", None),
    ".lora_a['v']": P(None, None, "fsdp", None),
    ".lora_b['down']": P(None, None, None, "fsdp"),
    ".lora_b['o']": P(None, None, None, "fsdp"),
    ".lora_b['q']": P(None, None, None, "tensor"),
    ".lora_b['v']": P(None, None, None, "tensor"),
    ".rank": P(None),
    ".scale": P(None),
}


def _mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS set by tests/conftest.py)")
  return sharding.make_mesh(data=2, fsdp=2, tensor=2,
                            devices=jax.devices()[:8])


def _specs(shardings):
  leaves = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {jax.tree_util.keystr(p): s.spec for p, s in leaves}


def test_golden_param_and_bank_partition_specs():
  mesh = _mesh()
  got = _specs(sharding.logical_sharding(
      llama.param_logical_axes(CFG), llama.param_shapes(CFG), mesh))
  assert got == GOLDEN_PARAMS
  got = _specs(sharding.logical_sharding(
      bank_lib.bank_logical_axes(SPEC), bank_lib.bank_shapes(CFG, SPEC), mesh))
  assert got == GOLDEN_BANK


def test_indivisible_dims_fall_back_to_replication():
  mesh = _mesh()
  spec = sharding.logical_to_spec(("vocab", "embed"), (255, 64), mesh)
  assert spec == P(None, "fsdp")
  spec = sharding.logical_to_spec(("batch", "length"), (6, 3), mesh)
  assert spec == P("data", None)  # 6 is not divisible by data*fsdp = 4


def test_mesh_errors_are_clear():
  with pytest.raises(ValueError, match="needs 8 devices, found 2"):
    sharding.make_mesh(2, 2, 2, devices=jax.devices()[:2])
  with pytest.raises(KeyError, match="no sharding rule"):
    sharding.logical_to_spec(("nope",), (4,), _mesh())


def test_sharded_forward_and_decode_equal_single_device():
  mesh = _mesh()
  params = llama.init_params(CFG, seed=0)
  bank = bank_lib.bank_from_weights(CFG, SPEC, {
      1: AdapterWeights.random(CFG, SPEC.targets, rank=4, seed=1, std=0.05),
      3: AdapterWeights.random(CFG, ("q", "v"), rank=2, seed=2, std=0.05)})
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (8, 6)), jnp.int32)
  idx = jnp.asarray([0, 1, 3, 1, 0, 3, 3, 1], jnp.int32)

  def run(params, bank, cache, tokens, idx):
    logits, cache = llama.forward(params, bank, idx, tokens, config=CFG,
                                  cache=cache)
    return logits, cache

  cache = init_cache(CFG, 8, 8)
  want_logits, want_cache = jax.jit(run)(params, bank, cache, tokens, idx)

  p_sh = sharding.logical_sharding(llama.param_logical_axes(CFG),
                                   llama.param_shapes(CFG), mesh)
  b_sh = sharding.logical_sharding(bank_lib.bank_logical_axes(SPEC),
                                   bank_lib.bank_shapes(CFG, SPEC), mesh)
  c_sh = sharding.logical_sharding(cache_logical_axes(),
                                   cache_shapes(CFG, 8, 8), mesh)
  batch_sh = jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(("batch", "length"), tokens.shape, mesh))
  idx_sh = jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(("batch",), idx.shape, mesh))
  with sharding.use_mesh_rules(mesh):
    step = jax.jit(run, in_shardings=(p_sh, b_sh, c_sh, batch_sh, idx_sh),
                   out_shardings=(None, c_sh))
    got_logits, got_cache = step(
        jax.device_put(params, p_sh), jax.device_put(bank, b_sh),
        init_cache(CFG, 8, 8, sharding=c_sh), jax.device_put(tokens, batch_sh),
        jax.device_put(idx, idx_sh))
  assert len(got_logits.sharding.device_set) == 8
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_cache.k, want_cache.k, rtol=1e-5, atol=1e-5)


# The large-bank rule set: the slot axis takes fsdp and tensor, so the
# factor widths those axes would shard are left whole.
GOLDEN_BANK_SLOT_SHARDED = {
    ".lora_a['down']": P(("fsdp", "tensor"), None, None, None),
    ".lora_a['o']": P(("fsdp", "tensor"), None, None, None),
    ".lora_a['q']": P(("fsdp", "tensor"), None, None, None),
    ".lora_a['v']": P(("fsdp", "tensor"), None, None, None),
    ".lora_b['down']": P(("fsdp", "tensor"), None, None, None),
    ".lora_b['o']": P(("fsdp", "tensor"), None, None, None),
    ".lora_b['q']": P(("fsdp", "tensor"), None, None, None),
    ".lora_b['v']": P(("fsdp", "tensor"), None, None, None),
    ".rank": P(("fsdp", "tensor")),
    ".scale": P(("fsdp", "tensor")),
}


def test_golden_slot_sharded_bank_specs_and_params_unchanged():
  mesh = _mesh()
  rules = sharding.RULE_SETS["slot_sharded"]
  got = _specs(sharding.logical_sharding(
      bank_lib.bank_logical_axes(SPEC), bank_lib.bank_shapes(CFG, SPEC), mesh,
      rules))
  assert got == GOLDEN_BANK_SLOT_SHARDED
  got = _specs(sharding.logical_sharding(
      llama.param_logical_axes(CFG), llama.param_shapes(CFG), mesh, rules))
  assert got == GOLDEN_PARAMS


def test_slot_sharded_bank_forward_equals_single_device_and_writes_reuse():
  """Rows gather adapters living on other chips; one program for any slot."""
  mesh = _mesh()
  rules = sharding.RULE_SETS["slot_sharded"]
  spec = SPEC.replace(num_slots=8)
  params = llama.init_params(CFG, seed=0)
  weights = {1: AdapterWeights.random(CFG, spec.targets, rank=4, seed=1,
                                      std=0.05),
             6: AdapterWeights.random(CFG, ("q", "v"), rank=2, seed=2,
                                      std=0.05)}
  bank = bank_lib.bank_from_weights(CFG, spec, weights)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 6)),
                       jnp.int32)
  idx = jnp.asarray([0, 1, 6, 1, 0, 6, 6, 1], jnp.int32)
  fwd = lambda p, b, i, t: llama.forward(p, b, i, t, config=CFG,
                                         lora_impl="gather")[0]
  want = jax.jit(fwd)(params, bank, idx, tokens)

  b_sh = sharding.logical_sharding(bank_lib.bank_logical_axes(spec),
                                   bank_lib.bank_shapes(CFG, spec), mesh,
                                   rules)
  p_sh = sharding.logical_sharding(llama.param_logical_axes(CFG),
                                   llama.param_shapes(CFG), mesh, rules)
  sharded = bank_lib.init_bank(CFG, spec, sharding=b_sh)
  assert sharded.lora_a["q"].sharding.spec[0] == ("fsdp", "tensor")
  # pylint: disable=protected-access
  sharded = bank_lib.write_slot(sharded, 1, weights[1], CFG, spec)
  programs = bank_lib._write_slot._cache_size()
  sharded = bank_lib.write_slot(sharded, 6, weights[6], CFG, spec)
  assert bank_lib._write_slot._cache_size() == programs  # no recompile
  assert sharded.lora_a["q"].sharding == b_sh.lora_a["q"]
  with sharding.use_mesh_rules(mesh, rules):
    got = jax.jit(fwd)(jax.device_put(params, p_sh), sharded, idx, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
