"""Expert parallelism on 8 CPU devices: sharded == unsharded, golden shardings.

The unsharded oracle is `moe.experts_ffn` (grouped matmuls) and its dense
reference; the sharded path must agree on every mesh layout (expert only,
data x expert, expert x tensor, data x fsdp x expert x tensor), forward and
gradients, with a per-token adapter hook, and must really split the experts
and exchange tokens by collectives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mintjax import sharding
from mintjax.model import expert_parallel as ep
from mintjax.model import moe

T, D, F, E, K = 32, 16, 32, 8, 2

MESHES = {  # name -> make_mesh kwargs (8 devices)
    "expert8": dict(data=1, fsdp=1, expert=8, tensor=1),
    "data2_expert4": dict(data=2, fsdp=1, expert=4, tensor=1),
    "expert4_tensor2": dict(data=1, fsdp=1, expert=4, tensor=2),
    "data2_fsdp1_expert2_tensor2": dict(data=2, fsdp=1, expert=2, tensor=2),
}


def _inputs(dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(T, D)), dtype)
  params = {
      "gate": jnp.asarray(r.normal(size=(E, D, F)) / 4, dtype),
      "up": jnp.asarray(r.normal(size=(E, D, F)) / 4, dtype),
      "down": jnp.asarray(r.normal(size=(E, F, D)) / 6, dtype),
  }
  # Skewed routing: expert 3 takes most tokens (one device's experts get far
  # more than T * K / n pairs; nothing may be dropped).
  ids = r.choice(E, size=(T, K), p=[.05, .05, .05, .6, .05, .1, .05, .05])
  ids[:, 1] = (ids[:, 0] + 1 + r.integers(0, E - 1, size=T)) % E
  w = r.random(size=(T, K))
  w = w / w.sum(1, keepdims=True)
  return x, params, jnp.asarray(ids, jnp.int32), jnp.asarray(w, jnp.float32)


def _sharded_fn(mesh, **kw):
  return jax.jit(functools.partial(ep.experts_ffn_sharded, mesh=mesh, **kw))


@pytest.fixture(scope="module", params=list(MESHES))
def mesh(request):
  return sharding.make_mesh(**MESHES[request.param])


def test_sharded_equals_unsharded(mesh):
  x, params, ids, w = _inputs()
  want = jax.jit(moe.experts_ffn)(x, params, ids, w)
  dense = moe.experts_ffn_reference(x, params, ids, w)
  got = _sharded_fn(mesh)(x, params, ids, w)
  # Same math; only the order of the float32 sums over choices and devices
  # differs (psum_scatter), so a few ulps of the ~1 outputs.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)
  # The output is split over the token axes like the input.
  spec = got.sharding.spec
  assert spec[0] in (ep.token_axes(mesh), ep.token_axes(mesh)[0]), spec


# Gradients on one layout by default (each compile costs seconds on 2
# cores); the other three under `make test-moe`.
@pytest.mark.parametrize("mesh_name", [
    "data2_fsdp1_expert2_tensor2",
    pytest.param("expert8", marks=pytest.mark.moe),
    pytest.param("data2_expert4", marks=pytest.mark.moe),
    pytest.param("expert4_tensor2", marks=pytest.mark.moe)])
def test_gradients_equal_unsharded(mesh_name):
  mesh = sharding.make_mesh(**MESHES[mesh_name])
  x, params, ids, w = _inputs(seed=1)
  cot = jnp.asarray(np.random.default_rng(5).normal(size=(T, D)), jnp.float32)

  def loss(fn):
    return lambda x, p, w: jnp.sum(fn(x, p, ids, w) * cot)

  want = jax.jit(jax.grad(loss(moe.experts_ffn), argnums=(0, 1, 2)))(
      x, params, w)
  got = jax.jit(jax.grad(loss(functools.partial(
      ep.experts_ffn_sharded, mesh=mesh)), argnums=(0, 1, 2)))(x, params, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.moe
def test_bf16_matches_unsharded():
  mesh = sharding.make_mesh(**MESHES["data2_expert4"])
  x, params, ids, w = _inputs(jnp.bfloat16, seed=2)
  got = _sharded_fn(mesh)(x, params, ids, w)
  assert got.dtype == jnp.bfloat16
  want = moe.experts_ffn_reference(x.astype(jnp.float32),
                                   jax.tree.map(lambda a: a.astype(
                                       jnp.float32), params), ids, w)
  np.testing.assert_allclose(got.astype(np.float32), want, rtol=3e-2,
                             atol=3e-2)


def test_adapter_hook_sees_global_ids_and_gathered_rows():
  # A per-(token, expert) delta that depends on each token's "slot" (shipped
  # through adapter_rows) and the global expert id: sharded == unsharded.
  mesh = sharding.make_mesh(**MESHES["data2_expert4"])
  x, params, ids, w = _inputs(seed=3)
  slot_t = jnp.asarray(np.arange(T) % 5, jnp.int32)
  table = jnp.asarray(np.random.default_rng(4).normal(size=(5, E, 1)),
                      jnp.float32)

  def delta(name, h, expert_m, token_m, slots):
    return (table[slots[token_m], expert_m] * jnp.sum(h, -1, keepdims=True)
            * (name == "up"))

  def unsharded_hook(name, h, *, expert_m, token_m, group_sizes_e):
    assert group_sizes_e.shape == (E,)
    return delta(name, h, expert_m, token_m, slot_t)

  def sharded_hook(name, h, *, expert_m, token_m, group_sizes_e, rows):
    assert group_sizes_e.shape == (E,)
    return delta(name, h, expert_m, token_m, rows)

  want = jax.jit(functools.partial(moe.experts_ffn, adapter=unsharded_hook))(
      x, params, ids, w)
  base = jax.jit(moe.experts_ffn)(x, params, ids, w)
  got = jax.jit(functools.partial(
      ep.experts_ffn_sharded, mesh=mesh, adapter=sharded_hook))(
          x, params, ids, w, adapter_rows=slot_t)
  assert np.abs(np.asarray(want - base)).max() > 1e-2  # the hook matters
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_golden_shardings_and_collectives():
  mesh = sharding.make_mesh(**MESHES["expert4_tensor2"])
  x, params, ids, w = _inputs()
  specs = ep.expert_param_specs(mesh, F)
  assert specs == {"gate": P("expert", None, "tensor"),
                   "up": P("expert", None, "tensor"),
                   "down": P("expert", "tensor", None)}
  # The shared rules table maps the logical `experts` axis the same way, and
  # tokens ride the expert axis as data; a 3-axis mesh ignores `expert`.
  assert sharding.logical_to_spec(("layers", "experts", "embed", "mlp"),
                                  (2, E, D, F), mesh) == P(
                                      None, "expert", None, "tensor")
  assert sharding.logical_to_spec(("batch", "length"), (8, 4), mesh) == P(
      "expert", None)
  flat = sharding.make_mesh(data=2, fsdp=4)
  assert sharding.logical_to_spec(("experts", "embed"), (E, D), flat) == P(
      None, "fsdp")
  placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
            for k, v in params.items()}
  # Each device holds E/4 experts and half the FFN width.
  assert placed["gate"].addressable_shards[0].data.shape == (E // 4, D, F // 2)
  hlo = _sharded_fn(mesh).lower(x, placed, ids, w).compile().as_text()
  assert "all-gather" in hlo and "reduce-scatter" in hlo, "token exchange"
  assert "all-reduce" in hlo, "tensor-parallel FFN partial sums"
  # Expert weights are never gathered: every all-gather moves [*, D] tokens
  # or [*, K] routes, never an [E, ...] weight.
  for line in hlo.splitlines():
    if "all-gather(" in line and "=" in line:
      shape = line.split("=")[1].split("all-gather")[0]
      assert f"[{E}," not in shape, line


def test_bad_splits_are_refused():
  mesh = sharding.make_mesh(**MESHES["expert8"])
  x, params, ids, w = _inputs()
  six = {k: v[:6] for k, v in params.items()}
  with pytest.raises(ValueError, match="6 experts cannot be split"):
    ep.experts_ffn_sharded(x, six, ids % 6, w, mesh=mesh)
  with pytest.raises(ValueError, match="pad the batch to a multiple of 8"):
    ep.experts_ffn_sharded(x[:12], params, ids[:12], w[:12], mesh=mesh)


@pytest.mark.moe
def test_pallas_interpret_under_shard_map():
  # The TPU kernel path (megablox in interpret mode) inside the shard_map.
  mesh = sharding.make_mesh(**MESHES["expert4_tensor2"])
  x, params, ids, w = _inputs(seed=6)
  want = moe.experts_ffn(x, params, ids, w)
  got = _sharded_fn(mesh, impl="pallas", interpret=True)(x, params, ids, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
