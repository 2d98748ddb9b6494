"""TPU segment-grouped gather-LoRA kernel (interpret mode) against the oracle.

Covers the metadata builder, the fused forward kernel, gradients through the
custom_vjp (dx kernel + tgmm for dA/dB), dispatch, and the model forward with
the kernel path. TPU interpret mode reads uninitialised memory as NaN, so a
row the kernel forgets to store fails loudly here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kernel_cases import (assert_close, make_bank, make_slots, make_x,
                          value_and_grads)
from mintjax.adapters import lora_op
from pallas_kernels import metadata, ops, sgmv_tpu
from pallas_kernels.reference import reference_tokens

TM = 8  # tile rows: small so 37 tokens straddle many tiles.


def _sgmv(x, a, b, scale, slot, rank=None):
  return ops.sgmv_lora(x, a, b, scale, slot, rank, tile_rows=TM,
                       interpret="tpu")


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize("pattern", ["random", "one_slot", "own_slot",
                                     "slot0", "mixed_base"])
def test_metadata_visit_list(pattern):
  num_tokens, num_slots, tm = 37, 9, 8
  slot = make_slots(pattern, num_tokens, num_slots)
  meta = jax.jit(metadata.make_group_metadata, static_argnums=(1, 2))(
      slot, num_slots, tm)
  slot_np = np.asarray(slot)
  order = np.asarray(meta.order_t)
  np.testing.assert_array_equal(order, np.argsort(slot_np, kind="stable"))
  np.testing.assert_array_equal(np.asarray(meta.inverse_t)[order],
                                np.arange(num_tokens))
  np.testing.assert_array_equal(meta.group_sizes_s,
                                np.bincount(slot_np, minlength=num_slots))
  # Expected visits: every (row tile, slot) pair with at least one token.
  sorted_slots = slot_np[order]
  want = sorted({(p // tm, int(s)) for p, s in enumerate(sorted_slots)})
  n = int(meta.num_visits)
  valid = np.asarray(meta.tile_valid_g)
  assert valid[:n].all() and not valid[n:].any()
  got = list(zip(np.asarray(meta.tile_row_g)[:n].tolist(),
                 np.asarray(meta.tile_slot_g)[:n].tolist()))
  assert got == want
  assert len(valid) == metadata.max_visits(num_tokens, num_slots, tm)
  rows = np.asarray(meta.tile_row_g)
  assert (np.diff(rows) >= 0).all()  # tile revisits are consecutive
  first = np.asarray(meta.tile_first_g)[:n]
  np.testing.assert_array_equal(first, np.r_[1, np.diff(rows[:n]) != 0])
  slots_g = np.asarray(meta.tile_slot_g)[:n]
  np.testing.assert_array_equal(np.asarray(meta.tile_slot_first_g)[:n],
                                np.r_[1, np.diff(slots_g) != 0])
  np.testing.assert_array_equal(np.asarray(meta.tile_slot_last_g)[:n],
                                np.r_[np.diff(slots_g) != 0, 1])


def test_metadata_rejects_batched_slots():
  with pytest.raises(ValueError, match="flatten"):
    metadata.make_group_metadata(jnp.zeros((2, 3), jnp.int32), 4, 8)


# ----------------------------------------------------------------- forward


@pytest.mark.parametrize("pattern", ["random", "one_slot", "own_slot",
                                     "slot0", "mixed_base"])
def test_forward_slot_patterns(pattern):
  a, b, scale, _ = make_bank(0, 12, 32, 8, 48)
  x = make_x(0, 37, 32)  # 37: not a multiple of the tile
  slot = make_slots(pattern, 37, 12)
  assert_close(_sgmv(x, a, b, scale, slot),
               reference_tokens(x, a, b, scale, slot), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pass_rank", [False, True])
def test_forward_mixed_ranks(dtype, pass_rank):
  ranks = [0, 1, 2, 3, 8, 16, 33, 64]
  a, b, scale, rank = make_bank(1, 8, 32, 64, 16, ranks, dtype)
  x = make_x(1, 29, 32, dtype)
  slot = make_slots("mixed_base", 29, 8, seed=1)
  y = _sgmv(x, a, b, scale, slot, rank if pass_rank else None)
  assert y.dtype == dtype
  assert_close(y, reference_tokens(x, a, b, scale, slot), dtype)


def test_forward_256_slots_own_slot():
  a, b, scale, _ = make_bank(2, 256, 16, 4, 16)
  x = make_x(2, 40, 16)
  slot = jnp.asarray(np.random.default_rng(2).choice(
      np.arange(1, 256), 40, replace=False), jnp.int32)
  assert_close(_sgmv(x, a, b, scale, slot),
               reference_tokens(x, a, b, scale, slot), jnp.float32)


def test_rank_chunks_beyond_true_rank_are_skipped():
  # R = 256 is two 128-lane chunks; slot 1 has rank 8, so only chunk 0 runs.
  # Junk planted in slot 1's padded columns proves the skip: the kernel must
  # ignore it because rank_s says those columns are padding.
  a, b, scale, rank = make_bank(3, 3, 16, 256, 16, [0, 8, 200])
  junk_a = a.at[1, :, 128:].set(1.0)
  junk_b = b.at[1, 128:, :].set(1.0)
  x = make_x(3, 16, 16)
  slot = jnp.asarray([1, 2] * 8, jnp.int32)
  y = _sgmv(x, junk_a, junk_b, scale, slot, rank)
  assert_close(y, reference_tokens(x, a, b, scale, slot), jnp.float32)


def test_output_tiled_over_n_blocks(monkeypatch):
  # Wide projections (N up to 53,248) do not fit VMEM as one block, so the
  # fused kernel tiles N on its outermost grid axis and recomputes the shrink
  # per N block. A tiny budget forces 128-wide blocks here (2 per output, in
  # the forward and in the dx pass), and the gradients must still match.
  monkeypatch.setattr(sgmv_tpu, "VMEM_BUDGET", 1)
  assert sgmv_tpu.expand_block(256, fixed_bytes=0, bytes_per_col=1) == 128
  a, b, scale, rank = make_bank(7, 5, 256, 8, 256, [0, 8, 3, 8, 1])
  x = make_x(7, 21, 256)
  slot = make_slots("mixed_base", 21, 5, seed=7)
  got = value_and_grads(_sgmv)(x, a, b, scale, slot, rank)
  ref = lambda x, a, b, scale, slot, rank: reference_tokens(x, a, b, scale,
                                                             slot)
  want = value_and_grads(ref)(x, a, b, scale, slot, rank)
  for g, w in zip(got, want):  # y, dx, dA, dB, dscale
    assert_close(g, w, jnp.float32)


def test_bad_shapes_raise_teaching_error():
  a, b, scale, _ = make_bank(0, 4, 32, 8, 16)
  with pytest.raises(ValueError, match="expects x \\[T, d_in\\]"):
    _sgmv(make_x(0, 5, 31), a, b, scale, jnp.zeros((5,), jnp.int32))


# --------------------------------------------------------------- gradients


def _grads(fn, x, a, b, scale, slot, dy):
  loss = lambda *args: jnp.sum(fn(*args, slot).astype(jnp.float32) * dy)
  return jax.grad(loss, argnums=(0, 1, 2, 3))(x, a, b, scale)


@pytest.mark.parametrize("dtype,pattern", [
    (jnp.float32, "mixed_base"), (jnp.float32, "own_slot"),
    (jnp.bfloat16, "random"), (jnp.float32, "slot0")])
def test_gradients_match_reference(dtype, pattern):
  ranks = [0, 1, 4, 8, 8, 2, 8, 8, 8, 3]
  a, b, scale, _ = make_bank(4, 10, 16, 8, 16, ranks, dtype)
  x = make_x(4, 21, 16, dtype)
  slot = make_slots(pattern, 21, 10, seed=4)
  dy = make_x(5, 21, 16)
  got = _grads(_sgmv, x, a, b, scale, slot, dy)
  want = _grads(reference_tokens, x, a, b, scale, slot, dy)
  for name, g, w in zip(("dx", "dA", "dB", "dscale"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert_close(g, w, dtype)
  # Slots without tokens get exactly zero gradient (tgmm never writes them).
  absent = np.setdiff1d(np.arange(10), np.asarray(slot))
  assert not np.asarray(got[1], np.float32)[absent].any()
  assert not np.asarray(got[2], np.float32)[absent].any()


def test_check_grads_numerically():
  a, b, scale, _ = make_bank(6, 4, 8, 2, 8)
  x = make_x(6, 9, 8)
  slot = jnp.asarray([1, 2, 3, 0, 1, 1, 3, 2, 2], jnp.int32)
  check_grads(lambda x, a, b: _sgmv(x, a, b, scale, slot), (x, a, b),
              order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


# ------------------------------------------------------ dispatch and model


def test_dispatch_by_backend():
  assert lora_op.select_impl("tpu", 64, 4, 8) == "pallas_sgmv"
  assert lora_op.select_impl("gpu", 64, 4, 8) == "pallas_gpu"
  # By shape too: the Triton kernels need widths divisible by 16.
  assert lora_op.select_impl("gpu", 64, 4, 8, dims=(576, 192)) == "pallas_gpu"
  assert lora_op.select_impl("gpu", 64, 4, 8, dims=(24, 64)) == "gather"
  assert lora_op.select_impl("tpu", 64, 4, 8, dims=(24, 64)) == "pallas_sgmv"
  cpu = lora_op.select_impl("cpu", 64, 4, 8)
  assert not cpu.startswith("pallas")
  assert {"pallas_sgmv_interpret", "pallas_gpu_interpret"} <= set(
      lora_op.available_impls())


def test_model_forward_kernel_path_equals_reference():
  from mintjax.adapters.bank import bank_from_weights
  from mintjax.adapters.spec import AdapterSpec, AdapterWeights
  from mintjax.config import ModelConfig
  from mintjax.model import llama

  config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8)
  spec = AdapterSpec(targets=("q", "v", "down"), max_rank=8, num_slots=4)
  weights = {1: AdapterWeights.random(config, spec.targets, 8, seed=1),
             3: AdapterWeights.random(config, spec.targets, 2, seed=3)}
  bank = bank_from_weights(config, spec, weights)
  params = llama.init_params(config, seed=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 5)),
                       jnp.int32)
  idx = jnp.asarray([3, 0, 1], jnp.int32)
  want = llama.jit_forward(params, bank, idx, tokens, config=config,
                           lora_impl="reference")
  got = llama.jit_forward(params, bank, idx, tokens, config=config,
                          lora_impl="pallas_sgmv_interpret")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  base = llama.jit_forward(params, None, idx, tokens, config=config)
  assert not np.allclose(got[0], base[0], atol=1e-4)  # adapters matter
  np.testing.assert_allclose(got[1], base[1], rtol=1e-5, atol=1e-5)


def _tiny_model(max_rank, ranks, targets=("q", "k", "o", "down"),
                num_layers=2):
  from mintjax.adapters.bank import bank_from_weights
  from mintjax.adapters.spec import AdapterSpec, AdapterWeights
  from mintjax.config import ModelConfig
  from mintjax.model import llama

  config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32,
                       intermediate_size=64, num_layers=num_layers,
                       num_heads=4, num_kv_heads=2, head_dim=8)
  spec = AdapterSpec(targets=targets, max_rank=max_rank, num_slots=4)
  weights = {s: AdapterWeights.random(config, spec.targets, r, seed=s)
             for s, r in ranks.items()}
  bank = bank_from_weights(config, spec, weights)
  params = llama.init_params(config, seed=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 5)),
                       jnp.int32)
  return config, bank, params, tokens


def test_model_path_passes_true_rank_to_the_kernel():
  # Slot 1 has rank 8 in a rank-256 bank. Junk planted in its padded rank
  # columns 128..255 (a whole rank chunk) must be ignored on the kernel path
  # from the model: only the per-slot rank, carried by the bank through
  # LayerBank and lora_project to the kernel, says those columns are padding.
  from mintjax.model import llama
  config, bank, params, tokens = _tiny_model(256, {1: 8, 2: 200})
  junk = bank.replace(
      lora_a={t: a.at[1, :, :, 128:].set(0.5) for t, a in bank.lora_a.items()},
      lora_b={t: b.at[1, :, 128:, :].set(0.5) for t, b in bank.lora_b.items()})
  idx = jnp.asarray([1, 2, 0, 1], jnp.int32)
  run = lambda bank, impl: llama.jit_forward(params, bank, idx, tokens,
                                             config=config, lora_impl=impl)
  want = run(bank, "reference")
  assert not np.allclose(run(junk, "reference")[0], want[0], atol=1e-3)
  np.testing.assert_allclose(run(junk, "pallas_sgmv_interpret"), want,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (8, 1, 1)])
def test_kernel_path_on_a_mesh_is_shard_mapped(mesh_shape):
  # Mosaic kernels cannot be partitioned by XLA, so on a mesh the op runs the
  # kernel per shard: tokens over data, o/down's d_in over tensor (partial
  # sums psummed), q/k's d_out over tensor. Same numbers as the reference.
  from mintjax import sharding
  from mintjax.model import llama
  config, bank, params, tokens = _tiny_model(8, {1: 8, 3: 2})
  mesh = sharding.make_mesh(*mesh_shape)
  idx = jnp.asarray([3, 0, 1, 1], jnp.int32)

  def run(impl):
    with sharding.use_mesh_rules(mesh):
      return llama.jit_forward(params, bank, idx, tokens, config=config,
                               lora_impl=impl)

  hlo = jax.jit(functools.partial(
      llama.forward, config=config, lora_impl="pallas_sgmv_interpret"))
  with sharding.use_mesh_rules(mesh):
    text = hlo.lower(params, bank, idx, tokens).as_text()
  assert "sdy.manual_computation" in text  # the shard_map
  np.testing.assert_allclose(run("pallas_sgmv_interpret"), run("reference"),
                             rtol=1e-5, atol=1e-5)


def test_kernel_path_gradients_on_a_mesh():
  # The shard_map'd backward psums each cotangent over the mesh axes its
  # primal is not split over: dA/dB over the batch axis (data), dB and
  # dscale of o/down (d_in split over tensor) and dA of q/k (d_out split)
  # over tensor. Gradients of the bank must equal the reference's. (One
  # layer, q and o: interpret mode is slow, and k/down split like q/o.)
  from mintjax import sharding
  from mintjax.model import llama
  config, bank, params, tokens = _tiny_model(8, {1: 8, 3: 2}, ("q", "o"), 1)
  mesh = sharding.make_mesh(2, 1, 4)
  idx = jnp.asarray([3, 0, 1, 1], jnp.int32)

  def grads(impl):
    def loss(factors):
      logits, _ = llama.forward(params, bank.replace(**factors), idx, tokens,
                                config=config, lora_impl=impl)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    factors = dict(lora_a=bank.lora_a, lora_b=bank.lora_b, scale=bank.scale)
    with sharding.use_mesh_rules(mesh):
      return jax.jit(jax.grad(loss))(factors)

  got, want = grads("pallas_sgmv_interpret"), grads("reference")
  assert np.abs(want["lora_a"]["o"]).max() > 1e-5  # gradients are not moot
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
